//! `IssuanceService` over gRPC: the same use cases as the REST shim.

use std::{pin::Pin, sync::Arc};

use futures::Stream;

use issuer_domain::{
    model::Issuance,
    service::{ListParams, Principal},
};
use prost_types::Timestamp;
use serde_json::{Map, Value};
use tonic::{Request, Response, Status, metadata::MetadataValue};

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
        // Each item as the JSON its own CreateIssuance would validate; an item whose enum and
        // word disagree fails alone, with the error its own call would have had.
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
        let batch = uuid::Uuid::new_v4();
        let outcomes = crate::batch::create_batch(&self.app.issuances, &who, bodies, batch)
            .await
            .map_err(status)?;
        let created: Vec<_> = outcomes
            .iter()
            .filter_map(|o| o.as_ref().ok().map(|o| o.issuance.clone()))
            .collect();
        let mut messages = self.messages(&who, &created).await?.into_iter();
        let results = outcomes
            .into_iter()
            .enumerate()
            .map(|(index, outcome)| {
                let (outcome, replayed) = match (&refused[index], outcome) {
                    (Some(early), _) => (
                        pb::batch_item_result::Outcome::Error(item_error_of_status(early)),
                        false,
                    ),
                    (None, Ok(out)) => {
                        crate::metrics::create("grpc", out.replayed);
                        let mut message = messages.next().unwrap_or_default();
                        message.tx_code = out.tx_code.unwrap_or_default();
                        (
                            pb::batch_item_result::Outcome::Issuance(message),
                            out.replayed,
                        )
                    }
                    (None, Err(e)) => {
                        (pb::batch_item_result::Outcome::Error(item_error(&e)), false)
                    }
                };
                pb::BatchItemResult {
                    index: i32::try_from(index).unwrap_or(i32::MAX),
                    outcome: Some(outcome),
                    replayed,
                }
            })
            .collect();
        Ok(Response::new(pb::BatchCreateIssuancesResponse {
            batch_id: batch.to_string(),
            results,
        }))
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
