//! Batch creates: many create bodies in one call, each answered exactly as its own create
//! would be, in input order.
//!
//! Items run concurrently (bounded), so on Postgres their inserts share the group commit of
//! single creates. A key repeated inside one batch is a replay of its first occurrence (or
//! `idempotency_key_reused` when the bodies differ): the n-th occurrences of keys run only once
//! the (n-1)-th have finished, as if the items had come one after another.

use std::{collections::HashMap, sync::Arc};

use issuer_domain::{
    Error,
    model::Scope,
    service::{CreateOutcome, IssuanceService, Principal},
};
use serde_json::Value;
use tokio::{sync::Semaphore, task::JoinSet};
use uuid::Uuid;

/// Items of one batch in flight at once.
const CONCURRENCY: usize = 64;

/// Runs every item as a create of `batch`; the outcomes in input order.
pub async fn create_batch(
    issuances: &Arc<IssuanceService>,
    who: &Principal,
    items: Vec<Value>,
    batch: Uuid,
) -> Result<Vec<Result<CreateOutcome, Error>>, Error> {
    who.require(Scope::IssuanceWrite)?;
    // Round r holds the (r+1)-th occurrence of each key; items without a key stand alone.
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut rounds: Vec<Vec<(usize, Value)>> = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        let round = match item.get("client_request_id").and_then(Value::as_str) {
            Some(key) => {
                let n = seen.entry(key.to_owned()).or_insert(0);
                *n += 1;
                *n - 1
            }
            None => 0,
        };
        if rounds.len() <= round {
            rounds.resize_with(round + 1, Vec::new);
        }
        rounds[round].push((index, item));
    }
    let total = rounds.iter().map(Vec::len).sum();
    let mut out: Vec<Option<Result<CreateOutcome, Error>>> = (0..total).map(|_| None).collect();
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    for round in rounds {
        let mut tasks = JoinSet::new();
        for (index, item) in round {
            let (issuances, who, permits) = (issuances.clone(), who.clone(), permits.clone());
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await;
                (index, issuances.create_in(&who, &item, Some(batch)).await)
            });
        }
        while let Some(done) = tasks.join_next().await {
            let (index, outcome) = done.map_err(Error::internal)?;
            out[index] = Some(outcome);
        }
    }
    Ok(out
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Err(Error::internal("a batch item was not run"))))
        .collect())
}
