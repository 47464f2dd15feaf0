//! Event fan-out across replicas: "issuance X has new events" announcements, delivered to this
//! process's watchers directly and to other replicas through the Redis channel
//! `issuer:events`, whose messages from other replicas a bridge task re-broadcasts locally.
//!
//! Announcements carry no event data: the store stays the single source of events, and
//! watchers read them from there. A lost announcement (Redis down, a replica dying between
//! commit and publish) only delays watchers until they re-read the store; `generation` tells
//! them when announcements may have been missed.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::StreamExt;
use issuer_domain::{
    ids::{IssuanceId, TenantId, random_token},
    ports::EventNotifier,
};
use tokio::sync::{broadcast, mpsc};
use uuid::Uuid;

/// Channel on which replicas announce news to each other.
const REDIS_CHANNEL: &str = "issuer:events";

/// An announcement: this issuance of this tenant has new events.
pub type News = (TenantId, IssuanceId);

/// Announces and distributes "this issuance has new events" and "these status lists changed".
pub struct EventHub {
    local: broadcast::Sender<News>,
    lists: broadcast::Sender<Uuid>,
    to_redis: Option<mpsc::Sender<String>>,
    instance: String,
    /// Bumped whenever announcements may have been lost (Redis bridge reconnected).
    generation: Arc<AtomicU64>,
}

impl EventHub {
    fn new(to_redis: Option<mpsc::Sender<String>>) -> Self {
        Self {
            local: broadcast::channel(4096).0,
            lists: broadcast::channel(1024).0,
            to_redis,
            instance: random_token(9),
            generation: Arc::new(AtomicU64::new(0)),
        }
    }

    /// An in-process hub (the embedded default, or Redis not configured).
    pub fn local() -> Arc<Self> {
        Arc::new(Self::new(None))
    }

    /// A hub bridged through Redis pub/sub. Redis being down only costs cross-replica latency
    /// until it is back (watchers resync from the store meanwhile).
    pub fn with_redis(url: &str) -> Result<Arc<Self>, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let (to_redis, outbox) = mpsc::channel(4096);
        let hub = Arc::new(Self::new(Some(to_redis)));
        tokio::spawn(publish_loop(client.clone(), hub.instance.clone(), outbox));
        tokio::spawn(bridge_loop(client, Arc::downgrade(&hub)));
        Ok(hub)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<News> {
        self.local.subscribe()
    }

    /// Status lists whose entries changed, announced by other replicas.
    pub fn subscribe_status_lists(&self) -> broadcast::Receiver<Uuid> {
        self.lists.subscribe()
    }

    fn publish(&self, line: String) {
        if let Some(tx) = &self.to_redis
            && tx.try_send(line).is_err()
        {
            tracing::warn!("event announcement queue full; remote replicas catch up on resync");
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }
}

impl EventNotifier for EventHub {
    fn notify(&self, tenant: TenantId, issuance: IssuanceId) {
        // No receivers is not an error: nobody watches.
        let _ = self.local.send((tenant, issuance));
        self.publish(format!("{tenant}|{issuance}"));
    }

    /// Tells the other replicas; this replica's own subscribers are not told here (they hear
    /// other replicas' announcements only): whoever serves status lists here is told by the
    /// caller at once, before its request answers.
    fn status_lists_changed(&self, lists: &[Uuid]) {
        for list in lists {
            self.publish(format!("{LIST_PREFIX}{list}"));
        }
    }
}

async fn publish_loop(client: redis::Client, instance: String, mut outbox: mpsc::Receiver<String>) {
    let mut conn = None;
    while let Some(first) = outbox.recv().await {
        // One PUBLISH carries every announcement queued meanwhile: under load that is one
        // Redis round trip (and one message for each bridge) per burst, not per event.
        let mut msg = format!("{instance}\n{first}");
        for _ in 0..MAX_BATCH {
            match outbox.try_recv() {
                Ok(next) => {
                    msg.push('\n');
                    msg.push_str(&next);
                }
                Err(_) => break,
            }
        }
        if conn.is_none() {
            conn = redis::aio::ConnectionManager::new(client.clone())
                .await
                .ok();
        }
        let Some(c) = conn.as_mut() else {
            continue;
        };
        let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(REDIS_CHANNEL)
            .arg(&msg)
            .query_async(c)
            .await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, "event announcement not published");
            conn = None;
        }
    }
}

/// A status-list announcement's line: `list|<list id>` (an issuance's line is
/// `<tenant>|<issuance>`, which never starts with this).
const LIST_PREFIX: &str = "list|";

/// Announcements per PUBLISH at most.
const MAX_BATCH: usize = 512;

/// Re-broadcasts other replicas' announcements; reconnects with a pause while Redis is down.
async fn bridge_loop(client: redis::Client, hub: std::sync::Weak<EventHub>) {
    loop {
        let Some(me) = hub.upgrade() else { return };
        let instance = me.instance.clone();
        drop(me);
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => {
                if pubsub.subscribe(REDIS_CHANNEL).await.is_ok() {
                    if let Some(me) = hub.upgrade() {
                        // Anything announced while we were not subscribed may be missed.
                        me.generation.fetch_add(1, Ordering::Relaxed);
                    }
                    let mut messages = pubsub.into_on_message();
                    while let Some(msg) = messages.next().await {
                        let Some(me) = hub.upgrade() else { return };
                        let Ok(payload) = msg.get_payload::<String>() else {
                            continue;
                        };
                        // `<instance>` then one `<tenant>|<issuance>` or `list|<list>` per
                        // line.
                        let mut lines = payload.lines();
                        if lines.next() == Some(instance.as_str()) {
                            continue;
                        }
                        for line in lines {
                            if let Some(list) = line.strip_prefix(LIST_PREFIX) {
                                if let Ok(list) = list.parse() {
                                    let _ = me.lists.send(list);
                                }
                            } else if let Some((t, i)) = line.split_once('|')
                                && let (Ok(t), Ok(i)) = (t.parse(), i.parse())
                            {
                                let _ = me.local.send((t, i));
                            }
                        }
                    }
                }
                tracing::warn!("event bridge lost its Redis subscription; reconnecting");
            }
            Err(e) => tracing::debug!(error = %e, "event bridge cannot reach Redis"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
