//! Serving status lists to verifiers: each list's Status List Token built once per change and
//! cached, on every replica.
//!
//! A replica keeps, per list it has served, the token it built and the list's local *epoch*: a
//! counter bumped by every announcement that the list changed: this replica's own status
//! changes mark it before their request answers ([`Announcer`]), other replicas' arrive through
//! the event hub's Redis channel. A token is served
//! from the cache while it was built at the current epoch, the whole list was read within the
//! revalidation period (so a lost announcement delays a change by at most that), and it is
//! not past half its lifetime. Otherwise one request rebuilds it (the others of that moment
//! wait for it): after a change from the entries changed since the last read, applied to the
//! statuses it keeps, else from the whole list. When the statuses are those of the cached
//! token, the token is kept, so its entity tag stays and conditional requests keep answering
//! 304.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::Utc;
use issuer_auth::SigningKey;
use issuer_coordination::events::EventHub;
use issuer_domain::{
    Error,
    ids::{IssuanceId, TenantId},
    ports::{EventNotifier, Store},
};
use issuer_oid4vci::statuslist::{
    StatusListInput, StatusListToken, build_token, digest, pack, set_entries, status_list_uri,
};
use tokio::sync::broadcast::error::RecvError;
use uuid::Uuid;

/// How long a token is valid (`exp - iat`) at least; it is rebuilt at half of it.
const MIN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How often a cached token is checked against the whole list at most, even without
/// announcements.
const MAX_REVALIDATE: Duration = Duration::from_secs(60);
/// How far before the last read a read of changes starts: a change is stamped when planned and
/// visible when committed, on whichever replica's clock; the whole-list read of each
/// revalidation period catches anything later still.
const CHANGE_MARGIN: chrono::Duration = chrono::Duration::seconds(10);

/// The published status lists of this replica.
pub struct StatusLists {
    store: Arc<dyn Store>,
    key: SigningKey,
    issuer: String,
    ttl: Duration,
    revalidate: Duration,
    lifetime: Duration,
    slots: RwLock<HashMap<Uuid, Arc<Slot>>>,
    hub: Arc<EventHub>,
    /// The hub generation last seen: when it moves, announcements may have been lost.
    generation: AtomicU64,
}

#[derive(Default)]
struct Slot {
    epoch: AtomicU64,
    built: RwLock<Option<Built>>,
    /// One rebuild at a time; the requests of that moment wait and take its token.
    rebuild: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
struct Built {
    token: Arc<StatusListToken>,
    /// The statuses the token holds.
    packed: Arc<Vec<u8>>,
    size: i64,
    epoch: u64,
    /// When the whole list was last read (a rebuild after a change reads only what changed).
    full_read_at: Instant,
    /// When the store was last read: the next read of changes starts a margin before it.
    read_at: chrono::DateTime<Utc>,
}

impl StatusLists {
    /// The lists of the issuer `issuer`, signed with `key` (the credential key), `ttl` being
    /// how long relying parties may cache them. Follows the hub's announcements from now on.
    pub fn new(
        store: Arc<dyn Store>,
        key: SigningKey,
        issuer: &str,
        ttl: Duration,
        hub: Arc<EventHub>,
    ) -> Arc<Self> {
        let lists = Arc::new(Self {
            store,
            key,
            issuer: issuer.to_owned(),
            ttl,
            revalidate: ttl.min(MAX_REVALIDATE),
            lifetime: MIN_LIFETIME.max(ttl * 2),
            slots: RwLock::default(),
            generation: AtomicU64::new(hub.generation()),
            hub: hub.clone(),
        });
        tokio::spawn(follow(hub, Arc::downgrade(&lists)));
        lists
    }

    /// How long relying parties may cache a token (`ttl`, `Cache-Control: max-age`).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The list's current token, `None` when there is no such list.
    pub async fn token(&self, list_id: Uuid) -> Result<Option<Arc<StatusListToken>>, Error> {
        self.catch_up();
        let slot = self.slots.read().expect("lock").get(&list_id).cloned();
        let slot = match slot {
            Some(slot) => {
                if let Some(token) = self.fresh(&slot) {
                    return Ok(Some(token));
                }
                slot
            }
            // First request for this list here: its slot is in place before the store is
            // read, so that no announcement of that moment is missed.
            None => self
                .slots
                .write()
                .expect("lock")
                .entry(list_id)
                .or_default()
                .clone(),
        };
        let _rebuilding = match slot.rebuild.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                // Another request is rebuilding. When only the revalidation period is over
                // (no change announced), the current token is still the list as last known:
                // serve it rather than wait.
                if let Some(token) = self.unchanged(&slot) {
                    return Ok(Some(token));
                }
                slot.rebuild.lock().await
            }
        };
        if let Some(token) = self.fresh(&slot) {
            return Ok(Some(token));
        }
        let token = self.rebuild(list_id, &slot).await;
        if !matches!(token, Ok(Some(_))) && slot.built.read().expect("lock").is_none() {
            // A made-up id (or a failed first read) leaves nothing behind.
            self.slots.write().expect("lock").remove(&list_id);
        }
        token
    }

    /// Marks lists changed: their next request rebuilds them.
    pub fn changed(&self, lists: &[Uuid]) {
        let slots = self.slots.read().expect("lock");
        for list in lists {
            if let Some(slot) = slots.get(list) {
                slot.epoch.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Marks every list changed (announcements may have been lost).
    fn all_changed(&self) {
        for slot in self.slots.read().expect("lock").values() {
            slot.epoch.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// After the hub lost its subscription for a while, nothing cached is trusted.
    fn catch_up(&self) {
        // Every request looks; only a request that sees a new generation writes.
        let now = self.hub.generation();
        let seen = self.generation.load(Ordering::Acquire);
        if seen != now
            && self
                .generation
                .compare_exchange(seen, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.all_changed();
        }
    }

    /// The cached token, while it may be served without asking the store.
    fn fresh(&self, slot: &Slot) -> Option<Arc<StatusListToken>> {
        self.cached(slot, true)
    }

    /// The cached token while no change was announced since it was built and it is not past
    /// half its lifetime, whenever the whole list was last read.
    fn unchanged(&self, slot: &Slot) -> Option<Arc<StatusListToken>> {
        self.cached(slot, false)
    }

    fn cached(&self, slot: &Slot, read_recently: bool) -> Option<Arc<StatusListToken>> {
        let built = slot.built.read().expect("lock").clone()?;
        let age = (Utc::now() - built.token.iat).to_std().unwrap_or_default();
        (built.epoch == slot.epoch.load(Ordering::Acquire)
            && age < self.lifetime / 2
            && (!read_recently || built.full_read_at.elapsed() < self.revalidate))
            .then_some(built.token)
    }

    /// Reads the list and makes its token: the cached one again when the statuses did not
    /// change and it is not past half its lifetime, else a new one. After a change (the cached
    /// token otherwise current) only the entries changed since the last read are read, from a
    /// margin before it, so that a change committed late is not missed; the whole list is read
    /// again once per revalidation period.
    async fn rebuild(
        &self,
        list_id: Uuid,
        slot: &Slot,
    ) -> Result<Option<Arc<StatusListToken>>, Error> {
        // The epoch before the read: an announcement during the read leaves the result stale.
        let epoch = slot.epoch.load(Ordering::Acquire);
        let previous = slot.built.read().expect("lock").clone();
        let read_at = Utc::now();
        let (packed, size, full_read_at) = match previous
            .as_ref()
            .filter(|p| p.full_read_at.elapsed() < self.revalidate)
        {
            Some(p) => {
                let since = p.read_at - CHANGE_MARGIN;
                let Some(changes) = self.store.status_list(list_id, Some(since)).await? else {
                    return Ok(None);
                };
                let mut packed = p.packed.as_ref().clone();
                set_entries(&mut packed, p.size, &changes.entries);
                (packed, p.size, p.full_read_at)
            }
            None => {
                let full_read_at = Instant::now();
                let Some(content) = self.store.status_list(list_id, None).await? else {
                    return Ok(None);
                };
                (
                    pack(content.size, &content.entries),
                    content.size,
                    full_read_at,
                )
            }
        };
        let token = match &previous {
            Some(p)
                if p.token.content_digest == digest(&packed)
                    && (read_at - p.token.iat).to_std().unwrap_or_default() < self.lifetime / 2 =>
            {
                p.token.clone()
            }
            _ => {
                let uri = status_list_uri(&self.issuer, list_id);
                let lifetime = chrono::Duration::from_std(self.lifetime)
                    .map_err(|e| Error::internal(e.to_string()))?;
                let token = build_token(
                    &StatusListInput {
                        issuer: &self.issuer,
                        uri: &uri,
                        packed: &packed,
                        iat: read_at,
                        exp: read_at + lifetime,
                        ttl_secs: self.ttl.as_secs(),
                    },
                    &self.key,
                )
                .map_err(Error::internal)?;
                metrics::counter!("issuer_status_list_builds_total").increment(1);
                Arc::new(token)
            }
        };
        *slot.built.write().expect("lock") = Some(Built {
            token: token.clone(),
            packed: Arc::new(packed),
            size,
            epoch,
            full_read_at,
            read_at,
        });
        Ok(Some(token))
    }
}

/// The notifier of whatever changes credential status on this replica: the hub announces
/// events and list changes to the other replicas, and this replica's lists are marked changed
/// at once, so that a request that changed a status answers only when this replica serves the
/// change.
pub struct Announcer {
    pub hub: Arc<EventHub>,
    pub lists: Arc<StatusLists>,
}

impl EventNotifier for Announcer {
    fn notify(&self, tenant: TenantId, issuance: IssuanceId) {
        self.hub.notify(tenant, issuance);
    }

    fn status_lists_changed(&self, lists: &[Uuid]) {
        self.lists.changed(lists);
        self.hub.status_lists_changed(lists);
    }
}

/// Follows the other replicas' status-list announcements for as long as `lists` lives.
async fn follow(hub: Arc<EventHub>, lists: Weak<StatusLists>) {
    let mut changes = hub.subscribe_status_lists();
    drop(hub);
    loop {
        let change = changes.recv().await;
        let Some(me) = lists.upgrade() else { return };
        match change {
            Ok(list) => me.changed(&[list]),
            Err(RecvError::Lagged(_)) => me.all_changed(),
            Err(RecvError::Closed) => return,
        }
    }
}
