//! `IssuanceService` over gRPC: the same use cases as the REST shim.

use std::{
    collections::{HashSet, VecDeque},
    pin::Pin,
    sync::Arc,
};

use futures::{
    FutureExt, Stream, StreamExt,
    future::{BoxFuture, Shared},
};

use issuer_domain::{
    model::{Issuance, Scope},
    service::{ListParams, Principal},
    status::CredentialStatus,
};
use prost_types::Timestamp;
use serde_json::{Map, Value};
use tonic::{Request, Response, Status, Streaming, metadata::MetadataValue};

use super::{
    authenticate, enums,
    pb::{self, issuance_service_server::IssuanceService},
    status,
    structs::struct_to_json,
};
use crate::{
    app::App,
    view::{EventView, IssuanceView, issuance_views},
    watch::WatchItem,
};

pub struct IssuanceGrpc {
    app: Arc<App>,
}

impl IssuanceGrpc {
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }

    async fn message(&self, who: &Principal, i: &Issuance) -> Result<pb::Issuance, Status> {
        let mut v = self.messages(who, std::slice::from_ref(i)).await?;
        v.pop()
            .ok_or_else(|| status(issuer_domain::Error::internal("no message")))
    }

    /// Revoke, suspend or reinstate: the issuance after the change.
    async fn set_credential_status(
        &self,
        who: &Principal,
        id: &str,
        to: CredentialStatus,
        reason: &str,
    ) -> Result<Response<pb::Issuance>, Status> {
        let issuance = self
            .app
            .issuances
            .set_credential_status(who, id, to, Some(reason))
            .await
            .map_err(status)?;
        Ok(Response::new(self.message(who, &issuance).await?))
    }

    async fn messages(
        &self,
        who: &Principal,
        issuances: &[Issuance],
    ) -> Result<Vec<pb::Issuance>, Status> {
        Ok(
            issuance_views(&self.app.issuances, self.app.store.as_ref(), who, issuances)
                .await
                .map_err(status)?
                .into_iter()
                .map(to_message)
                .collect(),
        )
    }
}

// The deprecated words are filled in beside the enums for clients of before the enums.
#[allow(deprecated)]
fn to_message(v: IssuanceView) -> pb::Issuance {
    pb::Issuance {
        issuance_id: v.issuance_id,
        client_request_id: v.client_request_id,
        credential_configuration_id: v.credential_configuration_id,
        status: v.status.as_str().to_owned(),
        state: enums::state(v.status).into(),
        reason: v.reason.unwrap_or_default(),
        credential_offer_uri: v.credential_offer_uri.unwrap_or_default(),
        delivery: v.delivery.as_str().to_owned(),
        delivery_method: enums::delivery(v.delivery).into(),
        batch_id: v.batch_id.unwrap_or_default(),
        credential_status: v
            .credential_status
            .map_or(0, |s| enums::credential_status(s).into()),
        credentials_issued: i32::try_from(v.credentials_issued).unwrap_or(i32::MAX),
        expires_at: Some(timestamp(&v.expires_at)),
        created_at: Some(timestamp(&v.created_at)),
        updated_at: Some(timestamp(&v.updated_at)),
        tx_code: String::new(),
        email_delivery: v.email_delivery.map(|e| pb::EmailDelivery {
            state: e.state.as_str().to_owned(),
            email_state: enums::email_state(e.state).into(),
            attempts: e.attempts,
            last_error: e.last_error.unwrap_or_default(),
            sent_at: e.sent_at.as_ref().map(timestamp),
            next_attempt_at: e.next_attempt_at.as_ref().map(timestamp),
        }),
    }
}

fn timestamp(t: &chrono::DateTime<chrono::Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// The request as the JSON the domain validates; proto3 leaves unset strings empty, so empty
/// optional strings count as absent.
#[allow(deprecated)]
fn create_body(r: pb::CreateIssuanceRequest) -> Result<Value, Status> {
    let delivery = enums::merged_word(
        "delivery_method",
        r.delivery_method,
        "delivery",
        r.delivery,
        enums::delivery_word,
    )
    .map_err(status)?;
    let mut m = Map::new();
    m.insert("client_request_id".into(), r.client_request_id.into());
    for (name, value) in [
        ("credential_configuration_id", r.credential_configuration_id),
        ("delivery", delivery),
        ("email", r.email),
        ("grant_type", r.grant_type),
    ] {
        if !value.is_empty() {
            m.insert(name.into(), value.into());
        }
    }
    if let Some(p) = r.payload {
        m.insert("payload".into(), struct_to_json(p));
    }
    if let Some(e) = r.expires_in {
        m.insert("expires_in".into(), e.into());
    }
    if let Some(t) = r.tx_code {
        m.insert("tx_code".into(), t.into());
    }
    Ok(Value::Object(m))
}

#[allow(deprecated)]
fn event_message(e: &issuer_domain::model::IssuanceEvent) -> pb::IssuanceEvent {
    let v = EventView::from(e);
    pb::IssuanceEvent {
        issuance_id: v.issuance_id,
        sequence: v.sequence,
        r#type: v.kind.as_str().to_owned(),
        event_type: enums::event_type(v.kind).into(),
        status: v.status.as_str().to_owned(),
        state: enums::state(v.status).into(),
        reason: v.reason.unwrap_or_default(),
        occurred_at: Some(timestamp(&v.occurred_at)),
    }
}

/// A failed batch item: what its own call would have failed with.
fn item_error(e: &issuer_domain::Error) -> pb::ItemError {
    pb::ItemError {
        code: super::code_of(e.code) as i32,
        reason: e.code.as_str().to_ascii_uppercase(),
        message: e.message.clone(),
        field_violations: e
            .violations
            .iter()
            .map(|v| pb::FieldViolation {
                field: v.field.clone(),
                description: v.message.clone(),
            })
            .collect(),
    }
}

/// A batch item refused before it reached the use case (its fields disagree), from the status
/// its own call would have had.
fn item_error_of_status(s: &Status) -> pb::ItemError {
    use tonic_types::StatusExt;
    let details = s.get_error_details();
    pb::ItemError {
        code: s.code() as i32,
        reason: details
            .error_info()
            .map(|i| i.reason.clone())
            .unwrap_or_default(),
        message: s.message().to_owned(),
        field_violations: details
            .bad_request()
            .map(|b| {
                b.field_violations
                    .iter()
                    .map(|v| pb::FieldViolation {
                        field: v.field.clone(),
                        description: v.description.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchIssuanceResponse, Status>> + Send>>;
type ImportStream = Pin<Box<dyn Stream<Item = Result<pb::ImportIssuancesResponse, Status>> + Send>>;

/// Items of an import stream written together (one lock round trip, a few statements).
const IMPORT_GROUP: usize = 500;
/// Encoded bytes of one group at most (a group closes at the item that reaches it), so that a
/// stream of large items holds no more in memory than one of typical ones.
const IMPORT_GROUP_BYTES: usize = 2 << 20;
/// Groups of one import stream in flight at once.
const IMPORT_IN_FLIGHT: usize = 4;

/// The items of `inbound` that have arrived, in groups of up to [`IMPORT_GROUP`] items and
/// [`IMPORT_GROUP_BYTES`]: a busy stream fills its groups, a slow one is answered item by item
/// without waiting for more.
fn import_groups<S>(
    inbound: S,
) -> impl Stream<Item = Vec<Result<pb::CreateIssuanceRequest, Status>>>
where
    S: Stream<Item = Result<pb::CreateIssuanceRequest, Status>> + Unpin,
{
    use prost::Message;
    let size = |item: &Result<pb::CreateIssuanceRequest, Status>| {
        item.as_ref().map_or(0, |r| r.encoded_len())
    };
    futures::stream::unfold(inbound.fuse(), move |mut inbound| async move {
        let first = inbound.next().await?;
        let mut bytes = size(&first);
        let mut group = vec![first];
        while group.len() < IMPORT_GROUP && bytes < IMPORT_GROUP_BYTES {
            match inbound.next().now_or_never() {
                Some(Some(item)) => {
                    bytes += size(&item);
                    group.push(item);
                }
                // Nothing more has arrived yet, or the input ended.
                Some(None) | None => break,
            }
        }
        Some((group, inbound))
    })
}

/// What one item of a batch or an import is answered with.
enum Answer {
    Issuance(Box<pb::Issuance>),
    Error(pb::ItemError),
}

/// Creates `items` together, recording `batch` on each new issuance; each item's answer, in
/// order, with whether it was a replay. An item whose fields disagree (an enum and its
/// deprecated word) fails alone, with the error its own call would have had.
async fn answer_items(
    app: &App,
    who: &Principal,
    items: Vec<pb::CreateIssuanceRequest>,
    batch: uuid::Uuid,
) -> Result<Vec<(Answer, bool)>, Status> {
    let mut bodies = Vec::with_capacity(items.len());
    let mut refused: Vec<Option<Status>> = Vec::with_capacity(items.len());
    for item in items {
        match create_body(item) {
            Ok(body) => {
                bodies.push(body);
                refused.push(None);
            }
            Err(s) => {
                bodies.push(Value::Null);
                refused.push(Some(s));
            }
        }
    }
    let outcomes = app
        .issuances
        .create_many(who, &bodies, Some(batch))
        .await
        .map_err(status)?;
    let created: Vec<_> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().ok().map(|o| &o.issuance))
        .collect();
    let mut messages = issuance_views(&app.issuances, app.store.as_ref(), who, &created)
        .await
        .map_err(status)?
        .into_iter()
        .map(to_message);
    Ok(outcomes
        .into_iter()
        .zip(refused)
        .map(|(outcome, refused)| match (refused, outcome) {
            (Some(early), _) => (Answer::Error(item_error_of_status(&early)), false),
            (None, Ok(out)) => {
                crate::metrics::create("grpc", out.replayed);
                let mut message = messages.next().unwrap_or_default();
                message.tx_code = out.tx_code.unwrap_or_default();
                (Answer::Issuance(Box::new(message)), out.replayed)
            }
            (None, Err(e)) => (Answer::Error(item_error(&e)), false),
        })
        .collect())
}

/// One group of an import stream, the first of its items at stream position `first`: the
/// answers to the items before the first broken one, then that one's error, if any.
async fn import_group(
    app: Arc<App>,
    who: Principal,
    batch: uuid::Uuid,
    first: i64,
    group: Vec<Result<pb::CreateIssuanceRequest, Status>>,
) -> Vec<Result<pb::ImportIssuancesResponse, Status>> {
    let mut items = Vec::with_capacity(group.len());
    let mut broken = None;
    for item in group {
        match item {
            Ok(item) => items.push(item),
            Err(s) => {
                broken = Some(s);
                break;
            }
        }
    }
    let mut out: Vec<_> = if items.is_empty() {
        Vec::new()
    } else {
        match answer_items(&app, &who, items, batch).await {
            Ok(answers) => answers
                .into_iter()
                .zip(first..)
                .map(|((answer, replayed), index)| {
                    Ok(pb::ImportIssuancesResponse {
                        index,
                        outcome: Some(match answer {
                            Answer::Issuance(m) => {
                                pb::import_issuances_response::Outcome::Issuance(*m)
                            }
                            Answer::Error(e) => pb::import_issuances_response::Outcome::Error(e),
                        }),
                        replayed,
                    })
                })
                .collect(),
            Err(s) => vec![Err(s)],
        }
    };
    out.extend(broken.map(Err));
    out
}

#[tonic::async_trait]
impl IssuanceService for IssuanceGrpc {
    type WatchIssuanceStream = WatchStream;

    async fn watch_issuance(
        &self,
        req: Request<pb::WatchIssuanceRequest>,
    ) -> Result<Response<Self::WatchIssuanceStream>, Status> {
        let who = authenticate(&self.app, &req)?;
        let r = req.into_inner();
        let rx = self
            .app
            .watches
            .open(who, r.issuance_id, r.after_sequence)
            .await
            .map_err(status)?;
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            let item = rx.recv().await?;
            let msg = item.map_err(status).map(|item| pb::WatchIssuanceResponse {
                item: Some(match item {
                    WatchItem::Event(e) => {
                        pb::watch_issuance_response::Item::Event(event_message(&e))
                    }
                    WatchItem::Heartbeat => {
                        pb::watch_issuance_response::Item::Heartbeat(pb::Heartbeat {
                            at: Some(timestamp(&chrono::Utc::now())),
                        })
                    }
                }),
            });
            Some((msg, rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn create_issuance(
        &self,
        req: Request<pb::CreateIssuanceRequest>,
    ) -> Result<Response<pb::Issuance>, Status> {
        let who = authenticate(&self.app, &req)?;
        let body = create_body(req.into_inner())?;
        let out = self
            .app
            .issuances
            .create(&who, &body)
            .await
            .map_err(status)?;
        crate::metrics::create("grpc", out.replayed);
        let mut message = self.message(&who, &out.issuance).await?;
        message.tx_code = out.tx_code.unwrap_or_default();
        let mut res = Response::new(message);
        res.metadata_mut().insert(
            "idempotent-replayed",
            MetadataValue::from_static(if out.replayed { "true" } else { "false" }),
        );
        Ok(res)
    }

    async fn batch_create_issuances(
        &self,
        req: Request<pb::BatchCreateIssuancesRequest>,
    ) -> Result<Response<pb::BatchCreateIssuancesResponse>, Status> {
        let who = authenticate(&self.app, &req)?;
        let items = req.into_inner().issuances;
        let max = self.app.settings.batch_max_items;
        if !(1..=max).contains(&items.len()) {
            return Err(status(issuer_domain::Error::invalid_field(
                "issuances",
                format!("must hold 1 to {max} create requests"),
            )));
        }
        let batch = uuid::Uuid::new_v4();
        let results = answer_items(&self.app, &who, items, batch)
            .await?
            .into_iter()
            .enumerate()
            .map(|(index, (answer, replayed))| pb::BatchItemResult {
                index: i32::try_from(index).unwrap_or(i32::MAX),
                outcome: Some(match answer {
                    Answer::Issuance(m) => pb::batch_item_result::Outcome::Issuance(*m),
                    Answer::Error(e) => pb::batch_item_result::Outcome::Error(e),
                }),
                replayed,
            })
            .collect();
        Ok(Response::new(pb::BatchCreateIssuancesResponse {
            batch_id: batch.to_string(),
            results,
        }))
    }

    type ImportIssuancesStream = ImportStream;

    async fn import_issuances(
        &self,
        req: Request<Streaming<pb::CreateIssuanceRequest>>,
    ) -> Result<Response<Self::ImportIssuancesStream>, Status> {
        let who = authenticate(&self.app, &req)?;
        // Refused before anything is read, rather than once per item.
        who.require(Scope::IssuanceWrite).map_err(status)?;
        let batch = uuid::Uuid::new_v4();
        let app = self.app.clone();
        // The keys of the latest groups (all that can still be in flight), each with a future
        // that completes when its group is done.
        let mut recent: VecDeque<(HashSet<String>, Shared<BoxFuture<'static, ()>>)> =
            VecDeque::with_capacity(IMPORT_IN_FLIGHT + 1);
        let results = import_groups(req.into_inner())
            .scan(0_i64, |next, group| {
                let first = *next;
                *next += group.len() as i64;
                std::future::ready(Some((first, group)))
            })
            .map(move |(first, group)| {
                let (app, who) = (app.clone(), who.clone());
                // A key also in a group still in flight waits for that group, so that the
                // first occurrence of a key in the stream is the one that creates it.
                let keys: HashSet<String> = group
                    .iter()
                    .filter_map(|item| item.as_ref().ok())
                    .map(|item| item.client_request_id.clone())
                    .collect();
                let before: Vec<_> = recent
                    .iter()
                    .filter(|(other, _)| !keys.is_disjoint(other))
                    .map(|(_, done)| Shared::clone(done))
                    .collect();
                let (finished, done) = tokio::sync::oneshot::channel::<()>();
                recent.push_back((keys, done.map(|_| ()).boxed().shared()));
                if recent.len() > IMPORT_IN_FLIGHT {
                    recent.pop_front();
                }
                // A task of its own: a client that hangs up does not cut a group in half
                // (its rows written, its locks never released).
                let task = tokio::spawn(async move {
                    futures::future::join_all(before).await;
                    let answers = import_group(app, who, batch, first, group).await;
                    let _ = finished.send(());
                    answers
                });
                async move {
                    task.await.unwrap_or_else(|e| {
                        vec![Err(status(issuer_domain::Error::internal(e.to_string())))]
                    })
                }
            })
            // At most this many groups in flight: the input is read no further ahead, and
            // results wait for the client to take them (HTTP/2 flow control both ways).
            .buffered(IMPORT_IN_FLIGHT)
            .flat_map(futures::stream::iter)
            // The first error (the client's stream broke) ends the call with its status.
            .scan(false, |ended, item| {
                if *ended {
                    return std::future::ready(None);
                }
                *ended = item.is_err();
                std::future::ready(Some(item))
            });
        let mut res = Response::new(Box::pin(results) as ImportStream);
        if let Ok(value) = MetadataValue::try_from(batch.to_string()) {
            res.metadata_mut().insert("batch-id", value);
        }
        Ok(res)
    }

    async fn get_issuance(
        &self,
        req: Request<pb::GetIssuanceRequest>,
    ) -> Result<Response<pb::Issuance>, Status> {
        let who = authenticate(&self.app, &req)?;
        let id = req.into_inner().issuance_id;
        let issuance = self.app.issuances.get(&who, &id).await.map_err(status)?;
        Ok(Response::new(self.message(&who, &issuance).await?))
    }

    async fn cancel_issuance(
        &self,
        req: Request<pb::CancelIssuanceRequest>,
    ) -> Result<Response<pb::Issuance>, Status> {
        let who = authenticate(&self.app, &req)?;
        let id = req.into_inner().issuance_id;
        let issuance = self.app.issuances.cancel(&who, &id).await.map_err(status)?;
        Ok(Response::new(self.message(&who, &issuance).await?))
    }

    async fn revoke_credential(
        &self,
        req: Request<pb::RevokeCredentialRequest>,
    ) -> Result<Response<pb::Issuance>, Status> {
        let who = authenticate(&self.app, &req)?;
        let r = req.into_inner();
        self.set_credential_status(&who, &r.issuance_id, CredentialStatus::Revoked, &r.reason)
            .await
    }

    async fn suspend_credential(
        &self,
        req: Request<pb::SuspendCredentialRequest>,
    ) -> Result<Response<pb::Issuance>, Status> {
        let who = authenticate(&self.app, &req)?;
        let r = req.into_inner();
        self.set_credential_status(&who, &r.issuance_id, CredentialStatus::Suspended, &r.reason)
            .await
    }

    async fn reinstate_credential(
        &self,
        req: Request<pb::ReinstateCredentialRequest>,
    ) -> Result<Response<pb::Issuance>, Status> {
        let who = authenticate(&self.app, &req)?;
        let r = req.into_inner();
        self.set_credential_status(&who, &r.issuance_id, CredentialStatus::Valid, &r.reason)
            .await
    }

    async fn list_issuances(
        &self,
        req: Request<pb::ListIssuancesRequest>,
    ) -> Result<Response<pb::ListIssuancesResponse>, Status> {
        let who = authenticate(&self.app, &req)?;
        let r = req.into_inner();
        #[allow(deprecated)]
        let status_word =
            enums::merged_word("state", r.state, "status", r.status, enums::state_word)
                .map_err(status)?;
        let page = self
            .app
            .issuances
            .list(
                &who,
                ListParams {
                    page_size: Some(i64::from(r.page_size)),
                    page_token: Some(r.page_token),
                    status: Some(status_word),
                    client_request_id: Some(r.client_request_id),
                    batch_id: Some(r.batch_id),
                },
            )
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListIssuancesResponse {
            issuances: self.messages(&who, &page.issuances).await?,
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(key: usize, note_bytes: usize) -> Result<pb::CreateIssuanceRequest, Status> {
        Ok(pb::CreateIssuanceRequest {
            client_request_id: format!("k-{key}"),
            email: "x".repeat(note_bytes),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn import_groups_are_bounded_by_items_and_by_bytes() {
        // Everything has arrived: full groups of IMPORT_GROUP, then the rest.
        let sizes: Vec<usize> = import_groups(futures::stream::iter(
            (0..IMPORT_GROUP * 2 + 7).map(|k| item(k, 10)),
        ))
        .map(|g| g.len())
        .collect()
        .await;
        assert_eq!(sizes, [IMPORT_GROUP, IMPORT_GROUP, 7]);

        // Large items close a group at the byte bound, whatever its count.
        let big = 300 * 1024;
        let groups: Vec<_> = import_groups(futures::stream::iter((0..20).map(|k| item(k, big))))
            .collect()
            .await;
        let per_group = IMPORT_GROUP_BYTES.div_ceil(big + 16);
        assert_eq!(groups[0].len(), per_group);
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 20);
        // The keys stay in input order.
        let keys: Vec<String> = groups
            .into_iter()
            .flatten()
            .map(|i| i.unwrap().client_request_id)
            .collect();
        assert_eq!(keys, (0..20).map(|k| format!("k-{k}")).collect::<Vec<_>>());
    }
}
