//! A backend-independent test suite for [`Store`] implementations.
//!
//! Every check panics with a message naming what broke. Checks create their own tenants with
//! fresh random ids and never assume an empty database, so they can run against a shared
//! database and next to each other. The store's tests run each check as a test of its own per
//! backend (`tests.rs`); other crates get the suite with the `conformance` feature, and release
//! builds do not contain it.

use std::{collections::HashSet, sync::Arc};

use chrono::{DateTime, Duration, Timelike, Utc};
use issuer_domain::{
    ErrorCode,
    ids::{IssuanceId, TenantId, random_token},
    lifecycle::{Command, EmailUpdate, Transition, TransitionOutcome, TxCodeAttempt},
    model::{
        ApiClient, Branding, Delivery, EmailDelivery, EmailState, EventKind, InsertOutcome,
        Issuance, IssuanceEvent, IssuanceStatus, ListFilter, PRE_AUTHORIZED_CODE_GRANT, RateLimit,
        Reason, Scope, Tenant,
    },
    ports::Store,
    status::{CredentialStatus, StatusRef},
    webhook::{self, AttemptRecord, DeliveryState, WebhookDelivery, WebhookEndpoint},
};
use serde_json::json;

use crate::trunc_micros;

/// A timestamp with sub-microsecond digits, so the checks notice a store that keeps or rounds
/// them instead of truncating.
pub fn now_with_nanos() -> DateTime<Utc> {
    let now = Utc::now();
    now.with_nanosecond(now.nanosecond() / 1000 * 1000 + 789)
        .unwrap_or(now)
}

/// What the store is expected to hand back for `issuance`: the same, at microsecond precision.
pub fn normalized(issuance: &Issuance) -> Issuance {
    crate::rows::as_stored(issuance)
}

/// A tenant with a fresh random id.
pub fn sample_tenant() -> Tenant {
    Tenant::new(format!("conformance {}", random_token(6)), now_with_nanos())
}

/// Inserts a fresh tenant and returns its id.
pub async fn new_tenant(store: &dyn Store) -> TenantId {
    let tenant = sample_tenant();
    store
        .insert_tenant(&tenant)
        .await
        .expect("insert_tenant failed");
    tenant.id
}

/// A pending issuance with fresh random id, offer id and code hash, and its `created` event.
pub fn sample_issuance(tenant: TenantId, client_request_id: &str) -> (Issuance, IssuanceEvent) {
    let now = now_with_nanos();
    let issuance = Issuance {
        tenant_id: tenant,
        id: IssuanceId::new(),
        client_request_id: client_request_id.to_owned(),
        request_fingerprint: random_token(32),
        credential_configuration_id: "conformance_credential".to_owned(),
        status: IssuanceStatus::Pending,
        reason: None,
        version: 1,
        batch_id: None,
        payload: Some(json!({ "given_name": "Ada", "family_name": "Lovelace" })),
        delivery: Delivery::Email,
        email: Some("ada@example.org".to_owned()),
        grant_type: PRE_AUTHORIZED_CODE_GRANT.to_owned(),
        offer_id: random_token(18),
        pre_authorized_code_hash: random_token(32),
        pre_authorized_code_sealed: random_token(48),
        tx_code_hash: Some(random_token(32)),
        tx_code_failures: 0,
        code_redeemed_at: None,
        offer_retrieved_at: None,
        credential: None,
        notification_id: None,
        expires_at: now + Duration::hours(24),
        created_at: now,
        updated_at: now,
    };
    let event = first_event(&issuance);
    (issuance, event)
}

/// The `created` event of `issuance`, as the create use case builds it.
pub fn first_event(issuance: &Issuance) -> IssuanceEvent {
    IssuanceEvent {
        tenant_id: issuance.tenant_id,
        issuance_id: issuance.id,
        sequence: 1,
        global_sequence: 0,
        kind: EventKind::Created,
        status: issuance.status,
        reason: issuance.reason.map(|r| r.as_str().to_owned()),
        occurred_at: issuance.created_at,
    }
}

/// A fresh `client_request_id`.
pub fn new_request_id() -> String {
    format!("req-{}", random_token(12))
}

async fn insert(store: &dyn Store, issuance: &Issuance, event: &IssuanceEvent) -> InsertOutcome {
    store
        .insert_issuance(issuance, event)
        .await
        .unwrap_or_else(|e| panic!("insert_issuance failed: {}", e.chain()))
}

/// Inserts a fresh issuance and returns it as stored, asserting it was new.
async fn insert_new(store: &dyn Store, issuance: &Issuance, event: &IssuanceEvent) -> Issuance {
    match insert(store, issuance, event).await {
        InsertOutcome::Inserted(stored) => stored,
        InsertOutcome::Duplicate(other) => panic!(
            "insert of a fresh client_request_id `{}` returned Duplicate({})",
            issuance.client_request_id, other.id
        ),
    }
}

async fn get(store: &dyn Store, tenant: TenantId, id: IssuanceId) -> Option<Issuance> {
    store
        .get_issuance(tenant, id)
        .await
        .unwrap_or_else(|e| panic!("get_issuance failed: {}", e.chain()))
}

async fn events(store: &dyn Store, tenant: TenantId, id: IssuanceId) -> Vec<IssuanceEvent> {
    store
        .list_events(tenant, id, 0)
        .await
        .unwrap_or_else(|e| panic!("list_events failed: {}", e.chain()))
}

async fn list(store: &dyn Store, tenant: TenantId, filter: &ListFilter) -> Vec<IssuanceId> {
    store
        .list_issuances(tenant, filter)
        .await
        .unwrap_or_else(|e| panic!("list_issuances({filter:?}) failed: {}", e.chain()))
        .into_iter()
        .map(|i| i.id)
        .collect()
}

pub async fn ping(store: &dyn Store) {
    store
        .ping()
        .await
        .unwrap_or_else(|e| panic!("ping failed: {}", e.chain()));
}

pub async fn tenant_round_trip(store: &dyn Store) {
    let before = store.count_tenants().await.expect("count_tenants failed");
    let tenant = Tenant {
        default_offer_ttl_secs: 600,
        max_offer_ttl_secs: 7200,
        branding: Branding {
            display_name: Some("Acme Credentials".into()),
            logo_url: Some("https://acme.example/logo.png".into()),
            support_contact: None,
        },
        client_rate_limit: Some(RateLimit {
            per_sec: 7,
            burst: 21,
        }),
        ..sample_tenant()
    };
    store
        .insert_tenant(&tenant)
        .await
        .unwrap_or_else(|e| panic!("insert_tenant failed: {}", e.chain()));

    let got = store
        .get_tenant(tenant.id)
        .await
        .expect("get_tenant failed");
    let expected = Tenant {
        created_at: trunc_micros(tenant.created_at),
        ..tenant.clone()
    };
    assert_eq!(
        got,
        Some(expected),
        "get_tenant must return the inserted tenant"
    );
    assert_eq!(
        store
            .get_tenant(TenantId::new())
            .await
            .expect("get_tenant failed"),
        None,
        "get_tenant of an unknown id must be None"
    );
    let rebranded = Branding {
        display_name: None,
        logo_url: None,
        support_contact: Some("help@acme.example".into()),
    };
    assert!(
        store
            .update_tenant_branding(tenant.id, &rebranded)
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .get_tenant(tenant.id)
            .await
            .unwrap()
            .map(|t| t.branding),
        Some(rebranded.clone())
    );
    assert!(
        !store
            .update_tenant_branding(TenantId::new(), &rebranded)
            .await
            .unwrap(),
        "branding an unknown tenant changes nothing"
    );
    let limit = |t: Option<Tenant>| t.and_then(|t| t.client_rate_limit);
    let own = RateLimit {
        per_sec: 50,
        burst: 80,
    };
    assert!(
        store
            .update_tenant_rate_limit(tenant.id, Some(own))
            .await
            .unwrap()
    );
    assert_eq!(limit(store.get_tenant(tenant.id).await.unwrap()), Some(own));
    assert!(
        store
            .update_tenant_rate_limit(tenant.id, None)
            .await
            .unwrap()
    );
    assert_eq!(limit(store.get_tenant(tenant.id).await.unwrap()), None);
    assert!(
        !store
            .update_tenant_rate_limit(TenantId::new(), Some(own))
            .await
            .unwrap(),
        "limiting an unknown tenant changes nothing"
    );
    // Other checks may insert tenants concurrently on a shared database.
    let after = store.count_tenants().await.expect("count_tenants failed");
    assert!(
        after > before,
        "count_tenants must grow after insert_tenant (before {before}, after {after})"
    );
}

pub async fn clients(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let other_tenant = new_tenant(store).await;
    let client = ApiClient {
        tenant_id: tenant,
        client_id: format!("client-{}", random_token(12)),
        secret_hash: random_token(32),
        scopes: vec![Scope::IssuanceWrite, Scope::IssuanceRead],
        active: true,
        created_at: now_with_nanos(),
    };
    store
        .insert_client(&client)
        .await
        .unwrap_or_else(|e| panic!("insert_client failed: {}", e.chain()));
    let expected = ApiClient {
        created_at: trunc_micros(client.created_at),
        ..client.clone()
    };
    let found = store
        .find_client(&client.client_id)
        .await
        .expect("find_client failed");
    assert_eq!(
        found,
        Some(expected.clone()),
        "find_client must return the inserted client"
    );

    // The client id is unique across tenants: the token endpoint looks it up without one.
    for tenant_id in [tenant, other_tenant] {
        let dup = ApiClient {
            tenant_id,
            secret_hash: random_token(32),
            ..client.clone()
        };
        let err = store
            .insert_client(&dup)
            .await
            .expect_err("insert_client with a taken client id must fail");
        assert_eq!(
            err.code,
            ErrorCode::AlreadyExists,
            "a taken client id must fail with AlreadyExists, got {}",
            err.chain()
        );
    }

    let inactive = ApiClient {
        tenant_id: tenant,
        client_id: format!("client-{}", random_token(12)),
        secret_hash: random_token(32),
        scopes: vec![],
        active: false,
        created_at: now_with_nanos(),
    };
    store
        .insert_client(&inactive)
        .await
        .expect("insert_client failed");
    assert_eq!(
        store
            .find_client(&inactive.client_id)
            .await
            .expect("find_client failed"),
        Some(ApiClient {
            created_at: trunc_micros(inactive.created_at),
            ..inactive.clone()
        }),
        "an inactive client without scopes must round trip"
    );

    assert!(
        store
            .update_client_secret(tenant, &client.client_id, "new-hash")
            .await
            .expect("update_client_secret failed"),
        "update_client_secret of an existing client must return true"
    );
    assert!(
        !store
            .update_client_secret(other_tenant, &client.client_id, "foreign-hash")
            .await
            .expect("update_client_secret failed"),
        "update_client_secret through another tenant must return false"
    );
    assert!(
        !store
            .update_client_secret(tenant, "no-such-client", "x")
            .await
            .expect("update_client_secret failed"),
        "update_client_secret of an unknown client must return false"
    );
    let found = store
        .find_client(&client.client_id)
        .await
        .expect("find_client failed");
    assert_eq!(
        found,
        Some(ApiClient {
            secret_hash: "new-hash".to_owned(),
            ..expected
        }),
        "the secret must be the one set through the owning tenant"
    );
    assert_eq!(
        store
            .find_client("no-such-client")
            .await
            .expect("find_client failed"),
        None,
        "find_client of an unknown id must be None"
    );
}

pub async fn insert_returns_inserted(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let (issuance, event) = sample_issuance(tenant, &new_request_id());
    let stored = insert_new(store, &issuance, &event).await;
    assert_eq!(
        stored,
        normalized(&issuance),
        "insert_issuance must return the issuance as given (at microsecond precision)"
    );
    assert_eq!(
        get(store, tenant, issuance.id).await,
        Some(stored),
        "get_issuance must return the inserted issuance"
    );
}

pub async fn duplicate_returns_first(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let crid = new_request_id();
    let (first, first_ev) = sample_issuance(tenant, &crid);
    let first = insert_new(store, &first, &first_ev).await;

    let (second, second_ev) = sample_issuance(tenant, &crid);
    match insert(store, &second, &second_ev).await {
        InsertOutcome::Duplicate(existing) => assert_eq!(
            existing, first,
            "a duplicate insert must return the first issuance"
        ),
        InsertOutcome::Inserted(_) => {
            panic!("a second insert with the same client_request_id must return Duplicate")
        }
    }
    assert_eq!(
        get(store, tenant, second.id).await,
        None,
        "a duplicate insert must not write its issuance"
    );
    assert!(
        events(store, tenant, second.id).await.is_empty(),
        "a duplicate insert must not write an event"
    );
    assert_eq!(
        events(store, tenant, first.id).await.len(),
        1,
        "a duplicate insert must not add events to the first issuance"
    );
    let found = store
        .find_issuance_by_request_id(tenant, &crid)
        .await
        .expect("find_issuance_by_request_id failed");
    assert_eq!(
        found,
        Some(first),
        "find_issuance_by_request_id must find the first"
    );
}

pub async fn request_id_is_per_tenant(store: &dyn Store) {
    let crid = new_request_id();
    let (a, b) = (new_tenant(store).await, new_tenant(store).await);
    let (in_a, ev_a) = sample_issuance(a, &crid);
    let (in_b, ev_b) = sample_issuance(b, &crid);
    insert_new(store, &in_a, &ev_a).await;
    let stored_b = match insert(store, &in_b, &ev_b).await {
        InsertOutcome::Inserted(stored) => stored,
        InsertOutcome::Duplicate(_) => {
            panic!("the same client_request_id in another tenant must not be a duplicate")
        }
    };
    assert_eq!(stored_b, normalized(&in_b));
    let found = store
        .find_issuance_by_request_id(b, &crid)
        .await
        .expect("find_issuance_by_request_id failed")
        .map(|i| i.id);
    assert_eq!(
        found,
        Some(in_b.id),
        "each tenant must find its own issuance"
    );
}

pub async fn reads_are_scoped_by_tenant(store: &dyn Store) {
    let (owner, stranger) = (new_tenant(store).await, new_tenant(store).await);
    let (issuance, event) = sample_issuance(owner, &new_request_id());
    insert_new(store, &issuance, &event).await;

    assert_eq!(
        get(store, stranger, issuance.id).await,
        None,
        "get_issuance through another tenant must be None"
    );
    assert_eq!(
        store
            .find_issuance_by_request_id(stranger, &issuance.client_request_id)
            .await
            .expect("find_issuance_by_request_id failed"),
        None,
        "find_issuance_by_request_id through another tenant must be None"
    );
    assert!(
        list(
            store,
            stranger,
            &ListFilter {
                limit: 10,
                ..Default::default()
            }
        )
        .await
        .is_empty(),
        "list_issuances of another tenant must not show the issuance"
    );
    assert!(
        events(store, stranger, issuance.id).await.is_empty(),
        "list_events through another tenant must be empty"
    );
    assert_eq!(
        get(store, owner, IssuanceId::new()).await,
        None,
        "get_issuance of an unknown id must be None"
    );
}

pub async fn find_by_offer_id(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let (issuance, event) = sample_issuance(tenant, &new_request_id());
    let stored = insert_new(store, &issuance, &event).await;
    let found = store
        .find_issuance_by_offer_id(&issuance.offer_id)
        .await
        .expect("find_issuance_by_offer_id failed");
    assert_eq!(
        found,
        Some(stored),
        "find_issuance_by_offer_id must find the issuance"
    );
    let missing = store
        .find_issuance_by_offer_id(&random_token(18))
        .await
        .expect("find_issuance_by_offer_id failed");
    assert_eq!(missing, None, "an unknown offer id must find nothing");
}

pub async fn list_order_and_filters(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let mut ids = Vec::new();
    for status in [
        IssuanceStatus::Pending,
        IssuanceStatus::Accepted,
        IssuanceStatus::Pending,
        IssuanceStatus::Rejected,
    ] {
        let (mut issuance, _) = sample_issuance(tenant, &new_request_id());
        issuance.status = status;
        let event = first_event(&issuance);
        insert_new(store, &issuance, &event).await;
        ids.push((issuance.id, status, issuance.client_request_id));
    }
    let mut newest_first: Vec<IssuanceId> = ids.iter().map(|(id, ..)| *id).collect();
    newest_first.sort_by(|a, b| b.cmp(a));

    let all = list(
        store,
        tenant,
        &ListFilter {
            limit: 100,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        all, newest_first,
        "list_issuances must return newest (highest id) first"
    );

    let limited = list(
        store,
        tenant,
        &ListFilter {
            limit: 2,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        limited,
        newest_first[..2],
        "list_issuances must honour the limit"
    );

    let pending = list(
        store,
        tenant,
        &ListFilter {
            status: Some(IssuanceStatus::Pending),
            limit: 100,
            ..Default::default()
        },
    )
    .await;
    let expected: Vec<IssuanceId> = newest_first
        .iter()
        .copied()
        .filter(|id| {
            ids.iter()
                .any(|(i, s, _)| i == id && *s == IssuanceStatus::Pending)
        })
        .collect();
    assert_eq!(
        pending, expected,
        "the status filter must select exactly that status"
    );

    let (wanted, _, crid) = &ids[1];
    let by_crid = list(
        store,
        tenant,
        &ListFilter {
            client_request_id: Some(crid.clone()),
            limit: 100,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        by_crid,
        vec![*wanted],
        "the client_request_id filter must select one issuance"
    );

    let none = list(
        store,
        tenant,
        &ListFilter {
            client_request_id: Some(crid.clone()),
            status: Some(IssuanceStatus::Error),
            limit: 100,
            ..Default::default()
        },
    )
    .await;
    assert!(none.is_empty(), "filters must combine with AND");
}

pub async fn list_paging(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let mut inserted = HashSet::new();
    for _ in 0..5 {
        let (issuance, event) = sample_issuance(tenant, &new_request_id());
        insert_new(store, &issuance, &event).await;
        inserted.insert(issuance.id);
    }
    let mut seen = Vec::new();
    let mut before = None;
    for page_no in 0.. {
        assert!(page_no < 10, "paging through 5 issuances must end");
        let page = list(
            store,
            tenant,
            &ListFilter {
                before,
                limit: 2,
                ..Default::default()
            },
        )
        .await;
        assert!(page.len() <= 2, "a page must not exceed the limit");
        let Some(last) = page.last() else { break };
        before = Some(*last);
        seen.extend(page);
    }
    assert_eq!(
        seen.len(),
        5,
        "paging must yield each issuance once, got {seen:?}"
    );
    assert_eq!(
        seen.iter().copied().collect::<HashSet<_>>(),
        inserted,
        "paging must yield exactly the tenant's issuances"
    );
    assert!(
        seen.windows(2).all(|w| w[0] > w[1]),
        "pages must continue in newest-first order"
    );
}

pub async fn first_event_written(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let (issuance, event) = sample_issuance(tenant, &new_request_id());
    insert_new(store, &issuance, &event).await;
    let got = events(store, tenant, issuance.id).await;
    assert_eq!(
        got.len(),
        1,
        "an insert must write exactly one event, got {got:?}"
    );
    let ev = &got[0];
    assert!(
        ev.global_sequence > 0,
        "the store must assign a positive global_sequence, got {}",
        ev.global_sequence
    );
    let expected = IssuanceEvent {
        global_sequence: ev.global_sequence,
        occurred_at: trunc_micros(event.occurred_at),
        ..event
    };
    assert_eq!(*ev, expected, "the stored event must be the one given");
    assert_eq!(ev.kind, EventKind::Created);
    assert_eq!(ev.sequence, 1);
    assert!(
        store
            .list_events(tenant, issuance.id, 1)
            .await
            .expect("list_events failed")
            .is_empty(),
        "list_events must return only events after the given sequence"
    );
}

pub async fn global_sequence_increases(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let other = new_tenant(store).await;
    let mut last = 0;
    for t in [tenant, other, tenant] {
        let (issuance, event) = sample_issuance(t, &new_request_id());
        insert_new(store, &issuance, &event).await;
        let got = events(store, t, issuance.id).await;
        let seq = got
            .first()
            .unwrap_or_else(|| panic!("no event written for issuance {}", issuance.id))
            .global_sequence;
        assert!(
            seq > last,
            "global_sequence must increase across issuances and tenants ({seq} after {last})"
        );
        last = seq;
    }
}

pub async fn payload_round_trip(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let payloads = [
        json!({
            "name": "Zoë Ångström – 日本語 😀",
            "nested": { "deeper": { "list": [1, -2, 3.5, "x", null, true, { "k": [] }] } },
            "empty": {},
            "quote\"and\\backslash": "line\nbreak\ttab",
            "big": 9_007_199_254_740_993_i64,
        }),
        json!([{ "a": 1 }, [[], [{}]], "ü"]),
        json!("just a string"),
    ];
    for payload in payloads {
        let (mut issuance, _) = sample_issuance(tenant, &new_request_id());
        issuance.payload = Some(payload.clone());
        let event = first_event(&issuance);
        let stored = insert_new(store, &issuance, &event).await;
        assert_eq!(
            stored.payload,
            Some(payload.clone()),
            "insert must return the payload"
        );
        let got = get(store, tenant, issuance.id)
            .await
            .expect("issuance vanished");
        assert_eq!(got.payload, Some(payload), "the payload must round trip");
    }

    let (mut purged, _) = sample_issuance(tenant, &new_request_id());
    purged.payload = None;
    purged.email = None;
    purged.delivery = Delivery::Qr;
    purged.status = IssuanceStatus::Error;
    purged.reason = Some(Reason::CredentialFailure);
    let event = first_event(&purged);
    let stored = insert_new(store, &purged, &event).await;
    assert_eq!(
        stored,
        normalized(&purged),
        "an issuance without payload or email must round trip"
    );
}

/// `n` tasks insert issuances sharing one `client_request_id` at once: exactly one wins, every
/// other one gets the winner back, and only the winner's event exists.
pub async fn concurrent_duplicates(store: Arc<dyn Store>, n: usize) {
    let tenant = new_tenant(store.as_ref()).await;
    let crid = new_request_id();
    let candidates: Vec<(Issuance, IssuanceEvent)> =
        (0..n).map(|_| sample_issuance(tenant, &crid)).collect();
    let tasks: Vec<_> = candidates
        .iter()
        .cloned()
        .map(|(issuance, event)| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.insert_issuance(&issuance, &event).await })
        })
        .collect();

    let mut winners = Vec::new();
    let mut duplicates = Vec::new();
    for task in tasks {
        match task.await.expect("insert task panicked") {
            Ok(InsertOutcome::Inserted(i)) => winners.push(i),
            Ok(InsertOutcome::Duplicate(i)) => duplicates.push(i),
            Err(e) => panic!("a concurrent insert failed: {}", e.chain()),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one of {n} concurrent inserts must win, {} did",
        winners.len()
    );
    let winner = &winners[0];
    assert!(
        duplicates.iter().all(|d| d == winner),
        "every concurrent duplicate must carry the winner {}",
        winner.id
    );
    assert_eq!(
        get(store.as_ref(), tenant, winner.id).await.as_ref(),
        Some(winner)
    );
    assert_eq!(
        events(store.as_ref(), tenant, winner.id).await.len(),
        1,
        "the winner must have exactly one event"
    );
    for (loser, _) in candidates.iter().filter(|(i, _)| i.id != winner.id) {
        assert!(
            events(store.as_ref(), tenant, loser.id).await.is_empty(),
            "a losing insert {} must not write an event",
            loser.id
        );
    }
    let listed = list(
        store.as_ref(),
        tenant,
        &ListFilter {
            limit: 1000,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        listed,
        vec![winner.id],
        "the tenant must hold only the winner"
    );
}

/// Many creates at once, some keys requested once and some two or three times, for a tenant
/// with endpoints: every key is written exactly once with its event and its `issuance.created`
/// delivery, and every repeat gets the issuance that was written. (A store that groups
/// concurrent inserts into one statement must keep each caller's answer its own.)
pub async fn concurrent_mixed_creates(store: Arc<dyn Store>) {
    const KEYS: usize = 60;
    let tenant = new_tenant(store.as_ref()).await;
    let created_only = endpoint(tenant, &[webhook::ISSUANCE_CREATED], true);
    let outcomes = endpoint(tenant, &webhook::DEFAULT_TYPES, true);
    for e in [&created_only, &outcomes] {
        store.insert_webhook_endpoint(e).await.unwrap();
    }
    let keys: Vec<String> = (0..KEYS).map(|_| new_request_id()).collect();
    // Key k is requested 1 + k % 3 times; the requests are interleaved across keys.
    let mut candidates = Vec::new();
    for round in 0..3 {
        for (k, key) in keys.iter().enumerate() {
            if round <= k % 3 {
                candidates.push(sample_issuance(tenant, key));
            }
        }
    }
    let tasks: Vec<_> = candidates
        .iter()
        .cloned()
        .map(|(issuance, event)| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.insert_issuance(&issuance, &event).await })
        })
        .collect();
    let mut answers: std::collections::HashMap<String, Vec<InsertOutcome>> = Default::default();
    for task in tasks {
        let outcome = task
            .await
            .expect("insert task panicked")
            .unwrap_or_else(|e| panic!("a concurrent insert failed: {}", e.chain()));
        let key = match &outcome {
            InsertOutcome::Inserted(i) | InsertOutcome::Duplicate(i) => i.client_request_id.clone(),
        };
        answers.entry(key).or_default().push(outcome);
    }
    assert_eq!(answers.len(), KEYS, "every key gets answers");
    let mut winners = Vec::new();
    for (k, key) in keys.iter().enumerate() {
        let outcomes = &answers[key];
        assert_eq!(
            outcomes.len(),
            1 + k % 3,
            "one answer per request for {key}"
        );
        let inserted: Vec<&Issuance> = outcomes
            .iter()
            .filter_map(|o| match o {
                InsertOutcome::Inserted(i) => Some(i),
                InsertOutcome::Duplicate(_) => None,
            })
            .collect();
        assert_eq!(
            inserted.len(),
            1,
            "exactly one request for {key} is written"
        );
        let winner = inserted[0];
        let requested = candidates
            .iter()
            .find(|(i, _)| i.id == winner.id)
            .expect("the winner is one of the requests");
        assert_eq!(
            winner,
            &normalized(&requested.0),
            "the written issuance is the one requested"
        );
        for o in outcomes {
            if let InsertOutcome::Duplicate(d) = o {
                assert_eq!(d, winner, "a repeat of {key} gets the written issuance");
            }
        }
        assert_eq!(
            get(store.as_ref(), tenant, winner.id).await.as_ref(),
            Some(winner)
        );
        assert_eq!(
            events(store.as_ref(), tenant, winner.id).await.len(),
            1,
            "one event for {key}"
        );
        assert_eq!(
            email_rows(store.as_ref(), tenant, winner.id)
                .await
                .map(|e| e.state),
            Some(EmailState::Pending),
            "one email row for {key}"
        );
        winners.push(winner.id);
    }
    let mut announced: Vec<IssuanceId> = deliveries(store.as_ref(), tenant, &created_only)
        .await
        .iter()
        .map(|d| {
            assert_eq!(d.event_type, webhook::ISSUANCE_CREATED);
            assert_eq!(d.message_id, webhook::message_id(d.issuance_id, 1));
            d.issuance_id
        })
        .collect();
    announced.sort_by_key(|id| id.0);
    winners.sort_by_key(|id| id.0);
    assert_eq!(
        announced, winners,
        "one issuance.created delivery per written issuance"
    );
    assert!(
        deliveries(store.as_ref(), tenant, &outcomes)
            .await
            .is_empty(),
        "creation is not an outcome"
    );
}

async fn email_rows(store: &dyn Store, tenant: TenantId, id: IssuanceId) -> Option<EmailDelivery> {
    let mut rows = store
        .get_email_deliveries(tenant, &[id])
        .await
        .unwrap_or_else(|e| panic!("get_email_deliveries failed: {}", e.chain()));
    assert!(rows.len() <= 1, "one email row per issuance");
    rows.pop()
}

/// Claims due emails until one of `id` comes back (other checks may leave due emails behind on a
/// shared database).
async fn claim_email(
    store: &dyn Store,
    id: IssuanceId,
    now: DateTime<Utc>,
    lease: DateTime<Utc>,
) -> Option<EmailDelivery> {
    let claimed = store
        .claim_emails(now, lease, 1000)
        .await
        .unwrap_or_else(|e| panic!("claim_emails failed: {}", e.chain()));
    claimed.into_iter().find(|d| d.issuance_id == id)
}

/// The email outbox: a row written with every `delivery: email` issuance and only those; claims
/// lease it; attempts are recorded with their event only under their lease; the end of the offer
/// cancels an email not yet sent.
pub async fn email_outbox(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let other = new_tenant(store).await;
    let (mail, event) = sample_issuance(tenant, &new_request_id());
    insert_new(store, &mail, &event).await;
    let (quiet, _) = sample_issuance(tenant, &new_request_id());
    let quiet = Issuance {
        delivery: Delivery::None,
        email: None,
        ..quiet
    };
    let event = first_event(&quiet);
    insert_new(store, &quiet, &event).await;

    let row = email_rows(store, tenant, mail.id)
        .await
        .expect("an email row");
    let gauges = store
        .gauges()
        .await
        .unwrap_or_else(|e| panic!("gauges failed: {}", e.chain()));
    assert!(gauges.emails_pending >= 1, "{gauges:?}");
    assert!(
        gauges
            .email_oldest_due
            .is_some_and(|t| t <= trunc_micros(mail.created_at)),
        "{gauges:?}"
    );
    assert!(
        gauges.pool_max >= 1 && gauges.pool_size <= gauges.pool_max,
        "{gauges:?}"
    );
    assert_eq!(
        (row.state, row.attempts, row.next_attempt_at, row.sent_at),
        (EmailState::Pending, 0, trunc_micros(mail.created_at), None),
        "due at once"
    );
    assert_eq!(
        email_rows(store, tenant, quiet.id).await,
        None,
        "no email for delivery none"
    );
    assert_eq!(
        email_rows(store, other, mail.id).await,
        None,
        "scoped by tenant"
    );

    let now = now_with_nanos() + Duration::seconds(1);
    let lease = now + Duration::seconds(300);
    let claimed = claim_email(store, mail.id, now, lease)
        .await
        .expect("claimed");
    assert_eq!(claimed.next_attempt_at, trunc_micros(lease), "leased");
    assert!(
        claim_email(store, mail.id, now, lease).await.is_none(),
        "a leased email is not claimed again"
    );

    // A result under another lease is dropped, event and all.
    let stale = EmailUpdate {
        claimed_until: lease - Duration::seconds(1),
        state: EmailState::Sent,
        next_attempt_at: None,
        error: None,
    };
    assert_eq!(
        apply(store, tenant, mail.id, &email(stale, now)).await,
        TransitionOutcome::EmailLeaseLost
    );
    assert_eq!(
        events(store, tenant, mail.id).await.len(),
        1,
        "no event written"
    );

    // A failed attempt with a retry: event `email_failed` carrying the error.
    let retry_at = now + Duration::seconds(30);
    let failed = EmailUpdate {
        claimed_until: claimed.next_attempt_at,
        state: EmailState::Pending,
        next_attempt_at: Some(retry_at),
        error: Some("smtp: connection refused".into()),
    };
    apply(store, tenant, mail.id, &email(failed, now)).await;
    let row = email_rows(store, tenant, mail.id).await.unwrap();
    assert_eq!(
        (
            row.state,
            row.attempts,
            row.next_attempt_at,
            row.last_error.as_deref()
        ),
        (
            EmailState::Pending,
            1,
            trunc_micros(retry_at),
            Some("smtp: connection refused")
        )
    );
    let history = events(store, tenant, mail.id).await;
    let last = history.last().unwrap();
    assert_eq!(
        (last.kind, last.status, last.reason.as_deref()),
        (
            EventKind::EmailFailed,
            IssuanceStatus::Pending,
            Some("smtp: connection refused")
        )
    );
    assert!(
        claim_email(store, mail.id, now, lease).await.is_none(),
        "not due yet"
    );

    // The retry succeeds.
    let later = retry_at + Duration::seconds(1);
    let claimed = claim_email(store, mail.id, later, later + Duration::seconds(300))
        .await
        .expect("due again");
    let sent = EmailUpdate {
        claimed_until: claimed.next_attempt_at,
        state: EmailState::Sent,
        next_attempt_at: None,
        error: None,
    };
    apply(store, tenant, mail.id, &email(sent, later)).await;
    let row = email_rows(store, tenant, mail.id).await.unwrap();
    assert_eq!(
        (row.state, row.attempts, row.sent_at),
        (EmailState::Sent, 2, Some(trunc_micros(later)))
    );
    let last = events(store, tenant, mail.id).await.pop().unwrap();
    assert_eq!((last.kind, last.reason), (EventKind::EmailSent, None));
    apply(store, tenant, mail.id, &cancel_at(later)).await;
    assert_eq!(
        email_rows(store, tenant, mail.id).await.unwrap().state,
        EmailState::Sent,
        "a sent email stays sent"
    );

    // Cancelled before it went out: never claimed.
    let (early, event) = sample_issuance(tenant, &new_request_id());
    insert_new(store, &early, &event).await;
    apply(store, tenant, early.id, &cancel_at(now_with_nanos())).await;
    assert_eq!(
        email_rows(store, tenant, early.id).await.unwrap().state,
        EmailState::Cancelled
    );
    assert!(
        claim_email(store, early.id, later, later + Duration::seconds(300))
            .await
            .is_none()
    );
}

/// A command at a time: what the lifecycle plans a transition from.
pub struct Step {
    command: Command,
    at: DateTime<Utc>,
}

fn cancel_at(at: DateTime<Utc>) -> Step {
    Step {
        command: Command::Cancel,
        at,
    }
}

fn redeem(at: DateTime<Utc>) -> Step {
    Step {
        command: Command::RedeemCode,
        at,
    }
}

fn email(update: EmailUpdate, at: DateTime<Utc>) -> Step {
    Step {
        command: Command::EmailOutcome(update),
        at,
    }
}

/// Plans `step` on the issuance as stored now, as the lifecycle does.
async fn plan(store: &dyn Store, tenant: TenantId, id: IssuanceId, step: &Step) -> Transition {
    let current = get(store, tenant, id).await.expect("the issuance exists");
    current
        .plan(&step.command, step.at)
        .unwrap_or_else(|r| panic!("{:?} is refused: {r:?}", step.command))
        .unwrap_or_else(|| panic!("{:?} changes nothing", step.command))
}

async fn transition(store: &dyn Store, t: &Transition) -> TransitionOutcome {
    store
        .transition(t)
        .await
        .unwrap_or_else(|e| panic!("transition failed: {}", e.chain()))
}

/// Plans `step` on the stored issuance and applies it.
async fn apply(
    store: &dyn Store,
    tenant: TenantId,
    id: IssuanceId,
    step: &Step,
) -> TransitionOutcome {
    transition(store, &plan(store, tenant, id, step).await).await
}

/// A status change updates status, reason and `updated_at`, purges the payload and appends the
/// next event, and the stored row says the same.
pub async fn transition_applies_purges_and_appends(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let (issuance, event) = sample_issuance(tenant, &new_request_id());
    insert_new(store, &issuance, &event).await;
    let at = now_with_nanos();
    let TransitionOutcome::Applied(after) = apply(store, tenant, issuance.id, &cancel_at(at)).await
    else {
        panic!("a pending issuance must accept pending -> rejected");
    };
    assert_eq!(after.status, IssuanceStatus::Rejected);
    assert_eq!(after.reason, Some(Reason::Cancelled));
    assert_eq!(after.version, 2);
    assert_eq!(
        after.payload, None,
        "leaving pending must purge the payload"
    );
    assert_eq!(after.updated_at, trunc_micros(at));
    assert_eq!(
        after.offer_id, issuance.offer_id,
        "other columns are untouched"
    );
    assert_eq!(
        get(store, tenant, issuance.id).await.as_ref(),
        Some(&*after)
    );
    let evs = events(store, tenant, issuance.id).await;
    assert_eq!(evs.len(), 2, "the transition appends one event");
    let last = &evs[1];
    assert_eq!((last.sequence, last.kind.as_str()), (2, "cancelled"));
    assert_eq!(
        (last.status, last.reason.as_deref()),
        (IssuanceStatus::Rejected, Some("cancelled"))
    );
    assert_eq!(last.occurred_at, trunc_micros(at));
    assert!(last.global_sequence > evs[0].global_sequence);
}

/// A transition planned from a version that is no longer current changes nothing.
pub async fn stale_transition_changes_nothing(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let (issuance, event) = sample_issuance(tenant, &new_request_id());
    insert_new(store, &issuance, &event).await;
    let cancel = plan(store, tenant, issuance.id, &cancel_at(now_with_nanos())).await;
    let retrieve = plan(
        store,
        tenant,
        issuance.id,
        &Step {
            command: Command::RetrieveOffer,
            at: now_with_nanos(),
        },
    )
    .await;
    let TransitionOutcome::Applied(cancelled) = transition(store, &cancel).await else {
        panic!("the first transition applies");
    };
    for t in [&cancel, &retrieve] {
        assert_eq!(
            transition(store, t).await,
            TransitionOutcome::Stale,
            "planned from version 1, the issuance is at 2"
        );
    }
    assert_eq!(get(store, tenant, issuance.id).await, Some(*cancelled));
    assert_eq!(
        events(store, tenant, issuance.id).await.len(),
        2,
        "no event for a stale transition"
    );
}

/// Unknown ids and other tenants' issuances are stale, and nothing is written.
pub async fn transition_of_unknown_or_foreign_is_stale(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let other = new_tenant(store).await;
    let (issuance, event) = sample_issuance(tenant, &new_request_id());
    insert_new(store, &issuance, &event).await;
    let t = plan(store, tenant, issuance.id, &cancel_at(now_with_nanos())).await;
    let mut unknown = t.clone();
    unknown.after.id = IssuanceId::new();
    unknown.event.issuance_id = unknown.after.id;
    let mut foreign = t.clone();
    foreign.after.tenant_id = other;
    foreign.event.tenant_id = other;
    for t in [&unknown, &foreign] {
        assert_eq!(transition(store, t).await, TransitionOutcome::Stale);
    }
    assert_eq!(
        get(store, tenant, issuance.id).await.map(|i| i.status),
        Some(IssuanceStatus::Pending)
    );
    assert_eq!(events(store, tenant, issuance.id).await.len(), 1);
}

/// An event without a status change leaves status, payload and `updated_at` alone.
pub async fn plain_event_keeps_status_and_payload(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let (issuance, event) = sample_issuance(tenant, &new_request_id());
    let stored = insert_new(store, &issuance, &event).await;
    let at = now_with_nanos();
    let retrieved = Issuance {
        offer_retrieved_at: Some(trunc_micros(at)),
        credential: None,
        version: 2,
        ..stored
    };
    let step = Step {
        command: Command::RetrieveOffer,
        at,
    };
    assert_eq!(
        apply(store, tenant, issuance.id, &step).await,
        TransitionOutcome::Applied(Box::new(retrieved.clone()))
    );
    assert_eq!(get(store, tenant, issuance.id).await, Some(retrieved));
    let evs = events(store, tenant, issuance.id).await;
    assert_eq!(evs.len(), 2);
    assert_eq!(
        (evs[1].sequence, evs[1].kind.as_str(), evs[1].status),
        (2, "offer_retrieved", IssuanceStatus::Pending)
    );
}

/// The sweeper's query: pending and due, not pending-but-later, not already rejected.
pub async fn overdue_pending_lists_only_due_pending(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let now = now_with_nanos();
    let (mut due, e1) = sample_issuance(tenant, &new_request_id());
    due.expires_at = now - Duration::seconds(5);
    insert_new(store, &due, &e1).await;
    let (mut later, e2) = sample_issuance(tenant, &new_request_id());
    later.expires_at = now + Duration::seconds(60);
    insert_new(store, &later, &e2).await;
    let (mut done, e3) = sample_issuance(tenant, &new_request_id());
    done.expires_at = now - Duration::seconds(5);
    insert_new(store, &done, &e3).await;
    apply(store, tenant, done.id, &cancel_at(now)).await;

    let overdue = store
        .overdue_pending(now, 10_000)
        .await
        .expect("overdue_pending failed");
    assert!(
        overdue.contains(&(tenant, due.id)),
        "a due pending issuance is listed"
    );
    assert!(
        !overdue.contains(&(tenant, later.id)),
        "a pending issuance not yet due is not"
    );
    assert!(
        !overdue.contains(&(tenant, done.id)),
        "a rejected issuance is not"
    );
    assert!(
        store
            .overdue_pending(now, 0)
            .await
            .expect("limit 0")
            .is_empty()
    );
}

/// Concurrent transitions of one issuance: exactly one applies, the rest see its result.
pub async fn concurrent_transitions(store: Arc<dyn Store>, n: usize) {
    let tenant = new_tenant(store.as_ref()).await;
    let (issuance, event) = sample_issuance(tenant, &new_request_id());
    insert_new(store.as_ref(), &issuance, &event).await;
    // Each task planned from the same read, as concurrent requests do.
    let cancel = plan(
        store.as_ref(),
        tenant,
        issuance.id,
        &cancel_at(now_with_nanos()),
    )
    .await;
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (store, cancel) = (Arc::clone(&store), cancel.clone());
            tokio::spawn(async move { store.transition(&cancel).await })
        })
        .collect();
    let mut applied = 0;
    for task in tasks {
        match task.await.expect("transition task panicked") {
            Ok(TransitionOutcome::Applied(_)) => applied += 1,
            Ok(TransitionOutcome::Stale) => {}
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => panic!("a concurrent transition failed: {}", e.chain()),
        }
    }
    assert_eq!(
        applied, 1,
        "exactly one of {n} concurrent transitions applies"
    );
    assert_eq!(events(store.as_ref(), tenant, issuance.id).await.len(), 2);
}

/// Codes are found by their hash across tenants; failed transaction codes count atomically.
pub async fn code_lookup_and_tx_code_failures(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let (issuance, event) = sample_issuance(tenant, &new_request_id());
    let stored = insert_new(store, &issuance, &event).await;
    let found = store
        .find_issuance_by_code_hash(&issuance.pre_authorized_code_hash)
        .await
        .expect("find_issuance_by_code_hash failed");
    assert_eq!(found, Some(stored));
    assert_eq!(
        store
            .find_issuance_by_code_hash(&random_token(32))
            .await
            .unwrap(),
        None
    );
    let reserve = |tenant_id, version, max_attempts| TxCodeAttempt {
        tenant_id,
        id: issuance.id,
        version,
        max_attempts,
    };
    for expected in 1..=3 {
        let n = store
            .reserve_tx_code_attempt(&reserve(tenant, 1, 3))
            .await
            .expect("reserve attempt");
        assert_eq!(n, Some(expected), "attempts below the cap are counted");
    }
    assert_eq!(
        store
            .reserve_tx_code_attempt(&reserve(tenant, 1, 3))
            .await
            .unwrap(),
        None,
        "the cap is reached"
    );
    assert_eq!(
        get(store, tenant, issuance.id)
            .await
            .map(|i| i.tx_code_failures),
        Some(3),
        "a refused reservation counts nothing"
    );
    assert_eq!(
        store
            .reserve_tx_code_attempt(&reserve(tenant, 1, 5))
            .await
            .unwrap(),
        Some(4),
        "a higher cap allows more"
    );
    let other = new_tenant(store).await;
    assert_eq!(
        store
            .reserve_tx_code_attempt(&reserve(other, 1, 10))
            .await
            .unwrap(),
        None,
        "scoped by tenant"
    );
    // Once the issuance changed (here: its code redeemed), an attempt planned before counts
    // nothing, and the counter is no change of its version.
    apply(store, tenant, issuance.id, &redeem(now_with_nanos())).await;
    assert_eq!(
        store
            .reserve_tx_code_attempt(&reserve(tenant, 1, 10))
            .await
            .unwrap(),
        None,
        "planned from a version no longer current"
    );
    assert_eq!(
        get(store, tenant, issuance.id)
            .await
            .map(|i| (i.version, i.tx_code_failures)),
        Some((2, 4))
    );
}

/// Concurrent transaction-code attempts: of `n` at once, exactly `max` are reserved.
pub async fn concurrent_tx_code_attempts(store: Arc<dyn Store>, n: usize, max: i64) {
    let tenant = new_tenant(store.as_ref()).await;
    let (issuance, event) = sample_issuance(tenant, &new_request_id());
    insert_new(store.as_ref(), &issuance, &event).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                store
                    .reserve_tx_code_attempt(&TxCodeAttempt {
                        tenant_id: tenant,
                        id: issuance.id,
                        version: 1,
                        max_attempts: max,
                    })
                    .await
            })
        })
        .collect();
    let mut granted = Vec::new();
    for task in tasks {
        match task.await.expect("reservation task panicked") {
            Ok(Some(n)) => granted.push(n),
            Ok(None) => {}
            Err(e) => panic!("a concurrent reservation failed: {}", e.chain()),
        }
    }
    granted.sort_unstable();
    assert_eq!(
        granted,
        (1..=max).collect::<Vec<_>>(),
        "exactly {max} of {n} concurrent attempts are reserved, each with its own count"
    );
}

/// A code redemption applies once; the notification id set with a later transition stays.
pub async fn redemption_applies_once_and_keeps_notification_id(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let (issuance, event) = sample_issuance(tenant, &new_request_id());
    insert_new(store, &issuance, &event).await;
    let at = now_with_nanos();
    let redemption = plan(store, tenant, issuance.id, &redeem(at)).await;
    let TransitionOutcome::Applied(redeemed) = transition(store, &redemption).await else {
        panic!("the first redemption applies");
    };
    assert_eq!(redeemed.code_redeemed_at, Some(trunc_micros(at)));
    assert_eq!(redeemed.status, IssuanceStatus::Pending);
    assert!(redeemed.payload.is_some(), "redeeming keeps the payload");
    assert_eq!(
        transition(store, &redemption).await,
        TransitionOutcome::Stale,
        "a code is redeemed once"
    );
    let issued = Step {
        command: Command::IssueCredential {
            notification_id: "n-1".to_owned(),
            copies: allocate(store, 1, 1024).await,
            expires_at: now_with_nanos() + Duration::days(365),
        },
        at: now_with_nanos(),
    };
    let TransitionOutcome::Applied(accepted) = apply(store, tenant, issuance.id, &issued).await
    else {
        panic!("issuing applies");
    };
    assert_eq!(accepted.notification_id.as_deref(), Some("n-1"));
    assert_eq!(accepted.code_redeemed_at, Some(trunc_micros(at)), "kept");
    assert_eq!(accepted.payload, None);
    let kinds: Vec<EventKind> = events(store, tenant, issuance.id)
        .await
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            EventKind::Created,
            EventKind::TokenIssued,
            EventKind::CredentialIssued
        ]
    );
}

/// A nonce is accepted once in the whole issuer; expired ones can be purged.
pub async fn nonces_are_single_use_across_tenants(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let other = new_tenant(store).await;
    let nonce = random_token(32);
    let past = now_with_nanos() - Duration::seconds(10);
    assert!(
        store
            .use_nonce(tenant, &nonce, past)
            .await
            .expect("use_nonce")
    );
    assert!(
        !store.use_nonce(tenant, &nonce, past).await.unwrap(),
        "second use is refused"
    );
    assert!(
        !store.use_nonce(other, &nonce, past).await.unwrap(),
        "nonces are issuer-wide: another tenant cannot spend it again"
    );
    let fresh = random_token(32);
    assert!(
        store
            .use_nonce(tenant, &fresh, now_with_nanos() + Duration::minutes(5))
            .await
            .unwrap()
    );
    assert!(
        store
            .purge_used_nonces(now_with_nanos(), 1000)
            .await
            .expect("purge")
            >= 1
    );
    assert!(
        !store
            .use_nonce(tenant, &fresh, now_with_nanos())
            .await
            .unwrap(),
        "unexpired ones stay"
    );
}

/// Concurrent redemptions of one code: exactly one applies.
pub async fn concurrent_redemptions(store: Arc<dyn Store>, n: usize) {
    let tenant = new_tenant(store.as_ref()).await;
    let (issuance, event) = sample_issuance(tenant, &new_request_id());
    insert_new(store.as_ref(), &issuance, &event).await;
    let redemption = plan(
        store.as_ref(),
        tenant,
        issuance.id,
        &redeem(now_with_nanos()),
    )
    .await;
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (store, redemption) = (Arc::clone(&store), redemption.clone());
            tokio::spawn(async move { store.transition(&redemption).await })
        })
        .collect();
    let mut applied = 0;
    for task in tasks {
        if let TransitionOutcome::Applied(_) =
            task.await.expect("task panicked").expect("transition")
        {
            applied += 1;
        }
    }
    assert_eq!(
        applied, 1,
        "exactly one of {n} concurrent redemptions applies"
    );
}

fn endpoint(tenant: TenantId, types: &[&str], enabled: bool) -> WebhookEndpoint {
    let now = now_with_nanos();
    WebhookEndpoint {
        tenant_id: tenant,
        id: uuid::Uuid::new_v4(),
        url: format!("https://hooks.example/{}", random_token(6)),
        event_types: types.iter().map(|t| (*t).to_owned()).collect(),
        secret_sealed: random_token(32),
        previous_secret_sealed: None,
        previous_secret_expires_at: None,
        enabled,
        disabled_reason: None,
        failing_since: None,
        created_at: now,
        updated_at: now,
    }
}

async fn deliveries(
    store: &dyn Store,
    tenant: TenantId,
    endpoint: &WebhookEndpoint,
) -> Vec<WebhookDelivery> {
    store
        .list_deliveries(tenant, endpoint.id, 100)
        .await
        .expect("list_deliveries failed")
}

/// Deliveries are written with the events they announce, to the endpoints that asked for the
/// type and are enabled, with the documented payload.
pub async fn webhook_outbox_follows_events(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let outcomes = endpoint(tenant, &webhook::DEFAULT_TYPES, true);
    let created_only = endpoint(tenant, &[webhook::ISSUANCE_CREATED], true);
    let disabled = endpoint(tenant, &webhook::ALL_TYPES, false);
    for e in [&outcomes, &created_only, &disabled] {
        store
            .insert_webhook_endpoint(e)
            .await
            .expect("insert_webhook_endpoint failed");
    }
    assert_eq!(
        store
            .get_webhook_endpoint(tenant, outcomes.id)
            .await
            .unwrap()
            .map(|e| e.event_types),
        Some(outcomes.event_types.clone())
    );
    assert_eq!(store.list_webhook_endpoints(tenant).await.unwrap().len(), 3);

    let (issuance, event) = sample_issuance(tenant, &new_request_id());
    insert_new(store, &issuance, &event).await;
    let created = deliveries(store, tenant, &created_only).await;
    assert_eq!(
        created.len(),
        1,
        "issuance.created goes to the endpoint that asked for it"
    );
    assert_eq!(created[0].event_type, "issuance.created");
    assert_eq!(created[0].message_id, webhook::message_id(issuance.id, 1));
    assert_eq!(created[0].payload["data"]["status"], "pending");
    assert_eq!(created[0].state, DeliveryState::Pending);
    assert!(deliveries(store, tenant, &outcomes).await.is_empty());

    let retrieve = Step {
        command: Command::RetrieveOffer,
        at: now_with_nanos(),
    };
    apply(store, tenant, issuance.id, &retrieve).await;
    assert!(
        deliveries(store, tenant, &outcomes).await.is_empty(),
        "not an outcome"
    );
    apply(store, tenant, issuance.id, &cancel_at(now_with_nanos())).await;
    let rejected = deliveries(store, tenant, &outcomes).await;
    assert_eq!(rejected.len(), 1);
    let d = &rejected[0];
    assert_eq!(
        (d.event_type.as_str(), d.sequence),
        ("issuance.rejected", 3)
    );
    assert_eq!(d.payload["type"], "issuance.rejected");
    assert_eq!(d.payload["data"]["reason"], "cancelled");
    assert_eq!(
        d.payload["data"]["client_request_id"],
        issuance.client_request_id
    );
    assert_eq!(d.payload["data"]["sequence"], 3);
    assert!(
        deliveries(store, tenant, &disabled).await.is_empty(),
        "disabled endpoints get nothing"
    );
    assert_eq!(deliveries(store, tenant, &created_only).await.len(), 1);

    assert!(
        store
            .delete_webhook_endpoint(tenant, outcomes.id)
            .await
            .unwrap()
    );
    assert!(
        !store
            .delete_webhook_endpoint(tenant, outcomes.id)
            .await
            .unwrap()
    );
    assert!(
        deliveries(store, tenant, &outcomes).await.is_empty(),
        "deleted with the endpoint"
    );
}

/// A claim leases deliveries; attempts are recorded with the endpoint's failure bookkeeping.
pub async fn webhook_claims_are_leased_and_recorded(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let ep = endpoint(tenant, &webhook::ALL_TYPES, true);
    store.insert_webhook_endpoint(&ep).await.unwrap();
    let (issuance, event) = sample_issuance(tenant, &new_request_id());
    insert_new(store, &issuance, &event).await;
    let now = now_with_nanos() + Duration::seconds(1);
    let mine = |v: Vec<WebhookDelivery>| {
        v.into_iter()
            .filter(|d| d.tenant_id == tenant)
            .collect::<Vec<_>>()
    };
    let claimed = mine(
        store
            .claim_deliveries(now, now + Duration::seconds(60), 1000)
            .await
            .expect("claim"),
    );
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        claimed[0].next_attempt_at,
        trunc_micros(now + Duration::seconds(60)),
        "leased"
    );
    assert!(
        mine(
            store
                .claim_deliveries(now, now + Duration::seconds(60), 1000)
                .await
                .unwrap()
        )
        .is_empty(),
        "not twice"
    );
    let later = now + Duration::seconds(61);
    let again = mine(
        store
            .claim_deliveries(later, later + Duration::seconds(60), 1000)
            .await
            .unwrap(),
    );
    assert_eq!(again.len(), 1, "an expired lease frees the delivery");

    let failed = AttemptRecord {
        tenant_id: tenant,
        delivery_id: again[0].id,
        endpoint_id: ep.id,
        claimed_until: again[0].next_attempt_at,
        at: later,
        status: Some(500),
        error: Some("status 500".to_owned()),
        latency_ms: 12,
        state: DeliveryState::Pending,
        next_attempt_at: Some(later + Duration::seconds(5)),
        disable_endpoint: None,
    };
    store.record_attempt(&failed).await.expect("record_attempt");
    let d = &deliveries(store, tenant, &ep).await[0];
    assert_eq!(
        (d.attempts, d.last_status, d.state),
        (1, Some(500), DeliveryState::Pending)
    );
    assert_eq!(
        d.next_attempt_at,
        trunc_micros(later + Duration::seconds(5))
    );
    let e = store
        .get_webhook_endpoint(tenant, ep.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.failing_since, Some(trunc_micros(later)));

    // A result from a lease that is over (another dispatcher took the delivery) is dropped.
    store.record_attempt(&failed).await.unwrap();
    assert_eq!(
        deliveries(store, tenant, &ep).await[0].attempts,
        1,
        "stale result dropped"
    );

    let retry_at = later + Duration::seconds(6);
    let third = mine(
        store
            .claim_deliveries(retry_at, retry_at + Duration::seconds(60), 1000)
            .await
            .unwrap(),
    );
    assert_eq!(third.len(), 1, "due again after the retry delay");
    let delivered = AttemptRecord {
        claimed_until: third[0].next_attempt_at,
        status: Some(200),
        error: None,
        state: DeliveryState::Delivered,
        next_attempt_at: None,
        ..failed.clone()
    };
    store.record_attempt(&delivered).await.unwrap();
    let d = &deliveries(store, tenant, &ep).await[0];
    assert_eq!((d.attempts, d.state), (2, DeliveryState::Delivered));
    store
        .record_attempt(&AttemptRecord {
            state: DeliveryState::Pending,
            next_attempt_at: Some(retry_at),
            ..delivered
        })
        .await
        .unwrap();
    assert_eq!(
        deliveries(store, tenant, &ep).await[0].state,
        DeliveryState::Delivered,
        "a late failure cannot reopen a delivered delivery"
    );
    assert_eq!(
        store
            .get_webhook_endpoint(tenant, ep.id)
            .await
            .unwrap()
            .unwrap()
            .failing_since,
        None
    );
    let far = later + Duration::days(2);
    assert!(
        mine(store.claim_deliveries(far, far, 1000).await.unwrap()).is_empty(),
        "delivered is done"
    );

    assert!(
        store
            .retry_delivery(tenant, ep.id, d.id, far)
            .await
            .unwrap()
    );
    let retried = mine(store.claim_deliveries(far, far, 1000).await.unwrap());
    assert_eq!(retried.len(), 1, "manual retry");
    store
        .record_attempt(&AttemptRecord {
            claimed_until: retried[0].next_attempt_at,
            status: Some(410),
            state: DeliveryState::Failed,
            next_attempt_at: None,
            disable_endpoint: Some("gone".to_owned()),
            ..failed
        })
        .await
        .unwrap();
    let e = store
        .get_webhook_endpoint(tenant, ep.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (e.enabled, e.disabled_reason.as_deref()),
        (false, Some("gone"))
    );
    let other = new_tenant(store).await;
    assert!(
        !store.retry_delivery(other, ep.id, d.id, far).await.unwrap(),
        "scoped by tenant"
    );
}

/// Two dispatchers claiming at once never take the same delivery.
pub async fn concurrent_claims_are_disjoint(store: Arc<dyn Store>) {
    let tenant = new_tenant(store.as_ref()).await;
    let ep = endpoint(tenant, &webhook::ALL_TYPES, true);
    store.insert_webhook_endpoint(&ep).await.unwrap();
    for _ in 0..40 {
        let (issuance, event) = sample_issuance(tenant, &new_request_id());
        insert_new(store.as_ref(), &issuance, &event).await;
    }
    let now = now_with_nanos() + Duration::days(3);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .claim_deliveries(now, now + Duration::seconds(60), 15)
                    .await
            })
        })
        .collect();
    let mut seen = HashSet::new();
    for t in tasks {
        for d in t
            .await
            .unwrap()
            .expect("claim")
            .into_iter()
            .filter(|d| d.tenant_id == tenant)
        {
            assert!(seen.insert(d.id), "delivery {} claimed twice", d.id);
        }
    }
    assert_eq!(seen.len(), 40, "all claimed exactly once");
}

/// Ended issuances go with their events, deliveries and email rows, in batches; pending ones
/// and recent ones stay; a purged key can be used again.
pub async fn retention_purges_ended_issuances_and_everything_of_theirs(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let hook = endpoint(tenant, &webhook::ALL_TYPES, true);
    store
        .insert_webhook_endpoint(&hook)
        .await
        .expect("insert_webhook_endpoint failed");
    let mut ended = Vec::new();
    for _ in 0..3 {
        let (mut issuance, event) = sample_issuance(tenant, &new_request_id());
        issuance.delivery = Delivery::Email;
        issuance.email = Some("ada@example.com".into());
        insert_new(store, &issuance, &event).await;
        apply(store, tenant, issuance.id, &cancel_at(now_with_nanos())).await;
        ended.push(issuance);
    }
    let (pending, event) = sample_issuance(tenant, &new_request_id());
    insert_new(store, &pending, &event).await;
    assert!(!deliveries(store, tenant, &hook).await.is_empty());

    let past = now_with_nanos() - Duration::hours(1);
    let none = store.purge_ended(past, 100).await.expect("purge_ended");
    assert_eq!(none.issuances, 0, "nothing ended that long ago");

    let later = now_with_nanos() + Duration::seconds(1);
    let first = store.purge_ended(later, 2).await.expect("purge_ended");
    assert_eq!(first.issuances, 2, "a pass deletes at most its limit");
    let mut total = first;
    loop {
        let more = store.purge_ended(later, 2).await.expect("purge_ended");
        if more.issuances == 0 {
            break;
        }
        total.issuances += more.issuances;
        total.events += more.events;
        total.webhook_deliveries += more.webhook_deliveries;
    }
    // Other checks share the database: at least ours are gone.
    assert!(total.issuances >= 3, "{total:?}");
    assert!(total.events >= 6, "created + cancelled of each: {total:?}");
    for i in &ended {
        assert_eq!(get(store, tenant, i.id).await, None, "purged");
        assert!(events(store, tenant, i.id).await.is_empty());
        assert!(
            store
                .get_email_deliveries(tenant, &[i.id])
                .await
                .unwrap()
                .is_empty()
        );
    }
    assert!(
        deliveries(store, tenant, &hook)
            .await
            .iter()
            .all(|d| d.issuance_id == pending.id),
        "only the pending issuance's deliveries stay"
    );
    assert!(
        get(store, tenant, pending.id).await.is_some(),
        "pending stays"
    );
    // The key is free again.
    let (again, event) = sample_issuance(tenant, &ended[0].client_request_id);
    assert!(matches!(
        store.insert_issuance(&again, &event).await.unwrap(),
        InsertOutcome::Inserted(_)
    ));
}

async fn insert_group(
    store: &dyn Store,
    items: &[(Issuance, IssuanceEvent)],
) -> Vec<Result<InsertOutcome, issuer_domain::Error>> {
    let outcomes = store
        .insert_issuances(items)
        .await
        .unwrap_or_else(|e| panic!("insert_issuances failed: {}", e.chain()));
    assert_eq!(outcomes.len(), items.len(), "one outcome per item");
    outcomes
}

/// A batch written at once: more rows than one statement takes, across two tenants, with a key
/// written before. Each item is answered as its own insert would be, in order, and writes
/// what its own insert writes (event, email row).
pub async fn grouped_insert_answers_each_item(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let other = new_tenant(store).await;
    let (earlier, earlier_ev) = sample_issuance(tenant, &new_request_id());
    let earlier = insert_new(store, &earlier, &earlier_ev).await;

    let mut items: Vec<(Issuance, IssuanceEvent)> = (0..150)
        .map(|n| {
            let (issuance, _) = sample_issuance(tenant, &new_request_id());
            let issuance = Issuance {
                delivery: if n % 3 == 0 {
                    Delivery::Email
                } else {
                    Delivery::None
                },
                email: (n % 3 == 0).then(|| "ada@example.org".to_owned()),
                batch_id: Some(uuid::Uuid::from_u128(7)),
                ..issuance
            };
            let event = first_event(&issuance);
            (issuance, event)
        })
        .collect();
    // The key taken before, in the middle; the same key in another tenant is its own.
    items.insert(70, sample_issuance(tenant, &earlier.client_request_id));
    items.push(sample_issuance(other, &earlier.client_request_id));

    let outcomes = insert_group(store, &items).await;
    for (n, ((issuance, _), outcome)) in items.iter().zip(outcomes).enumerate() {
        match outcome {
            Ok(InsertOutcome::Duplicate(existing)) => {
                assert_eq!(n, 70, "only the taken key is a duplicate");
                assert_eq!(
                    existing, earlier,
                    "a duplicate carries the issuance written before"
                );
                assert_eq!(get(store, tenant, issuance.id).await, None);
            }
            Ok(InsertOutcome::Inserted(stored)) => {
                assert_ne!(n, 70, "the taken key must not be written again");
                assert_eq!(stored, normalized(issuance), "item {n} is stored as given");
                assert_eq!(
                    get(store, issuance.tenant_id, issuance.id).await.as_ref(),
                    Some(&stored)
                );
                assert_eq!(
                    events(store, issuance.tenant_id, issuance.id).await.len(),
                    1,
                    "item {n} has its created event"
                );
                assert_eq!(
                    email_rows(store, issuance.tenant_id, issuance.id)
                        .await
                        .is_some(),
                    issuance.delivery == Delivery::Email,
                    "item {n} has an email row exactly when it is delivered by email"
                );
            }
            Err(e) => panic!("item {n} failed: {}", e.chain()),
        }
    }
    let listed = list(
        store,
        tenant,
        &ListFilter {
            limit: 1000,
            batch_id: Some(uuid::Uuid::from_u128(7)),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        listed.len(),
        150,
        "the batch's issuances are listed by its id"
    );
}

/// Groups racing over the same keys, in different orders: each key is written once, and every
/// other group gets that issuance as a duplicate.
pub async fn concurrent_grouped_inserts(store: Arc<dyn Store>, groups: usize) {
    const KEYS: usize = 80;
    let tenant = new_tenant(store.as_ref()).await;
    let keys: Vec<String> = (0..KEYS).map(|_| new_request_id()).collect();
    let tasks: Vec<_> = (0..groups)
        .map(|g| {
            let store = Arc::clone(&store);
            let mut items: Vec<_> = keys.iter().map(|k| sample_issuance(tenant, k)).collect();
            items.rotate_left(g * 7 % KEYS);
            if g % 2 == 1 {
                items.reverse();
            }
            tokio::spawn(async move {
                let outcomes = store.insert_issuances(&items).await;
                (items, outcomes)
            })
        })
        .collect();
    let mut written: std::collections::HashMap<String, Issuance> = Default::default();
    let mut answers = Vec::new();
    for task in tasks {
        let (items, outcomes) = task.await.expect("group task panicked");
        let outcomes = outcomes.unwrap_or_else(|e| panic!("a group failed: {}", e.chain()));
        for ((issuance, _), outcome) in items.into_iter().zip(outcomes) {
            match outcome.unwrap_or_else(|e| panic!("an item failed: {}", e.chain())) {
                InsertOutcome::Inserted(stored) => {
                    let key = issuance.client_request_id.clone();
                    assert!(
                        written.insert(key, stored).is_none(),
                        "a key was written twice"
                    );
                }
                InsertOutcome::Duplicate(existing) => answers.push(existing),
            }
        }
    }
    assert_eq!(written.len(), KEYS, "every key is written once");
    assert_eq!(answers.len(), KEYS * (groups - 1));
    for existing in answers {
        assert_eq!(
            written.get(&existing.client_request_id),
            Some(&existing),
            "a duplicate carries the issuance that was written"
        );
    }
    let listed = list(
        store.as_ref(),
        tenant,
        &ListFilter {
            limit: 1000,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(listed.len(), KEYS, "the tenant holds one issuance per key");
}

/// Allocates `count` status entries of lists of `size`, checking what every allocation must
/// satisfy: each block within its list, each index below its list's size.
async fn allocate(store: &dyn Store, count: i64, size: i64) -> Vec<StatusRef> {
    let blocks = store
        .allocate_status(count, size)
        .await
        .unwrap_or_else(|e| panic!("allocate_status failed: {}", e.chain()));
    assert_eq!(blocks.iter().map(|b| b.count).sum::<i64>(), count);
    let refs: Vec<StatusRef> = blocks.iter().flat_map(|b| b.refs()).collect();
    for (block, r) in blocks
        .iter()
        .flat_map(|b| b.refs().into_iter().map(move |r| (b, r)))
    {
        assert!(
            block.first >= 0 && block.first + block.count <= block.size,
            "{block:?}"
        );
        assert!((0..block.size).contains(&r.idx), "{r:?} outside {block:?}");
    }
    refs
}

/// Status allocations are never handed out twice, lists fill to the last entry, and a new list
/// opens when they are full.
pub async fn status_allocations_are_unique_and_fill_lists(store: &dyn Store) {
    let mut seen = HashSet::new();
    for count in [3, 3, 3, 1, 5, 8, 2] {
        for r in allocate(store, count, 8).await {
            assert!(seen.insert(r), "{r:?} handed out twice");
        }
    }
    let lists: HashSet<_> = seen.iter().map(|r| r.list_id).collect();
    assert!(
        lists.len() >= 4,
        "25 allocations of 8-entry lists: {lists:?}"
    );
    for list in lists {
        let content = store
            .status_list(list, None)
            .await
            .unwrap()
            .expect("the list exists");
        assert!(content.entries.is_empty(), "nothing was revoked");
    }
    assert_eq!(
        store.status_list(uuid::Uuid::new_v4(), None).await.unwrap(),
        None
    );
}

/// Allocations racing on the same lists still never share an index.
pub async fn concurrent_status_allocations(store: Arc<dyn Store>, n: usize) {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { allocate(store.as_ref(), 2, 16).await })
        })
        .collect();
    let mut seen = HashSet::new();
    for t in tasks {
        for r in t.await.expect("allocation task") {
            assert!(seen.insert(r), "{r:?} handed out twice");
        }
    }
    assert_eq!(seen.len(), 2 * n);
}

/// An issuance that accepted a credential and then suspended, revoked, and purged.
async fn issue_copies(store: &dyn Store, tenant: TenantId, copies: Vec<StatusRef>) -> Issuance {
    let (issuance, event) = sample_issuance(tenant, &new_request_id());
    insert_new(store, &issuance, &event).await;
    apply(store, tenant, issuance.id, &redeem(now_with_nanos())).await;
    let issue = Step {
        command: Command::IssueCredential {
            notification_id: "n".into(),
            copies,
            expires_at: now_with_nanos() + Duration::days(365),
        },
        at: now_with_nanos(),
    };
    let TransitionOutcome::Applied(accepted) = apply(store, tenant, issuance.id, &issue).await
    else {
        panic!("issuing applies");
    };
    *accepted
}

fn set_status(to: CredentialStatus) -> Step {
    Step {
        command: Command::SetCredentialStatus {
            to,
            reason: Some("left".into()),
        },
        at: now_with_nanos(),
    }
}

/// Status changes reach every copy's entry and nothing else; the entries outlive the
/// issuance, which retention keeps while its credentials may still be revoked.
pub async fn credential_status_changes_reach_every_copy(store: &dyn Store) {
    let tenant = new_tenant(store).await;
    let copies = allocate(store, 3, 64).await;
    let accepted = issue_copies(store, tenant, copies.clone()).await;
    let credential = accepted.credential.expect("issued");
    assert_eq!(
        (credential.status, credential.count),
        (CredentialStatus::Valid, 3)
    );
    assert_eq!(
        get(store, tenant, accepted.id).await.as_ref(),
        Some(&accepted)
    );
    let neighbour = issue_copies(store, tenant, allocate(store, 1, 64).await).await;

    let mut lists = store.status_lists_of(tenant, accepted.id).await.unwrap();
    lists.sort();
    let mut expected: Vec<_> = copies
        .iter()
        .map(|r| r.list_id)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    expected.sort();
    assert_eq!(lists, expected);
    assert!(
        store
            .status_lists_of(new_tenant(store).await, accepted.id)
            .await
            .unwrap()
            .is_empty()
    );

    let entries = |list| async move {
        let mut e = store
            .status_list(list, None)
            .await
            .unwrap()
            .expect("list")
            .entries;
        e.sort();
        e
    };
    // A list reads out the entries that are not valid.
    let wanted = |value: u8| {
        let mut e: Vec<(i64, u8)> = copies
            .iter()
            .filter(|r| r.list_id == copies[0].list_id && value != 0)
            .map(|r| (r.idx, value))
            .collect();
        e.sort();
        e
    };
    apply(
        store,
        tenant,
        accepted.id,
        &set_status(CredentialStatus::Suspended),
    )
    .await;
    assert_eq!(entries(copies[0].list_id).await, wanted(2));
    let before_reinstating = now_with_nanos();
    apply(
        store,
        tenant,
        accepted.id,
        &set_status(CredentialStatus::Valid),
    )
    .await;
    assert_eq!(entries(copies[0].list_id).await, wanted(0));
    // Read as changes since a moment: the reinstated entries, valid again, and no other.
    let mut changed = store
        .status_list(copies[0].list_id, Some(before_reinstating))
        .await
        .unwrap()
        .expect("list")
        .entries;
    changed.sort();
    let mut reinstated: Vec<(i64, u8)> = copies
        .iter()
        .filter(|r| r.list_id == copies[0].list_id)
        .map(|r| (r.idx, 0))
        .collect();
    reinstated.sort();
    assert_eq!(changed, reinstated);
    let TransitionOutcome::Applied(revoked) = apply(
        store,
        tenant,
        accepted.id,
        &set_status(CredentialStatus::Revoked),
    )
    .await
    else {
        panic!("revoking applies");
    };
    assert_eq!(entries(copies[0].list_id).await, wanted(1));
    assert_eq!(
        revoked.credential.map(|c| (c.status, c.count)),
        Some((CredentialStatus::Revoked, 3))
    );
    let kinds: Vec<EventKind> = events(store, tenant, accepted.id)
        .await
        .into_iter()
        .map(|e| e.kind)
        .skip(3)
        .collect();
    assert_eq!(
        kinds,
        [
            EventKind::CredentialSuspended,
            EventKind::CredentialReinstated,
            EventKind::CredentialRevoked
        ]
    );

    // Retention takes the revoked issuance, keeps the one whose credential is valid, and
    // leaves every entry: a revoked credential stays revoked in its list.
    let later = now_with_nanos() + Duration::seconds(1);
    while store
        .purge_ended(later, 100)
        .await
        .expect("purge_ended")
        .issuances
        > 0
    {}
    assert_eq!(get(store, tenant, accepted.id).await, None);
    assert!(get(store, tenant, neighbour.id).await.is_some());
    assert_eq!(entries(copies[0].list_id).await, wanted(1));
}
