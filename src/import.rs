//! `issuer import FILE`: creates the offers of a JSONL or CSV file through a running service's
//! `ImportIssuances` stream, and writes what became of each line to a results file.
//!
//! The file is read as the stream goes (memory stays flat however long it is). Lines the
//! command can already tell are wrong (not JSON, a field of the wrong type) are answered here
//! and not sent; every other line is answered by the service, exactly as its own create would
//! be. The results file holds one JSON line per input line, in input order. Running the
//! command again on the same file is safe: what was done comes back as replays.

use std::{
    io::{BufRead, BufReader, IsTerminal, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use futures::StreamExt;
use issuer_domain::{Error, ErrorCode, FieldViolation};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::{
    grpc::{
        pb::{
            self, CreateIssuanceRequest, DeliveryMethod, import_issuances_response::Outcome,
            issuance_service_client::IssuanceServiceClient,
        },
        structs::json_to_struct,
    },
    wire,
};

/// How the input is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One create body (a JSON object) per line.
    Jsonl,
    /// A header of dotted paths (`payload.mandatee.firstName`), then one create per record.
    Csv,
}

impl Format {
    /// From the file name: `.csv` is CSV, anything else JSONL.
    pub fn of(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("csv") => Self::Csv,
            _ => Self::Jsonl,
        }
    }
}

/// How progress is shown on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar on a terminal, plain lines otherwise.
    Auto,
    Bar,
    Lines,
    None,
}

#[derive(Debug, Clone)]
pub struct ImportArgs {
    pub file: PathBuf,
    pub format: Option<Format>,
    /// The service's base URL, e.g. `https://issuer.example.com`.
    pub url: String,
    pub client_id: String,
    pub client_secret: String,
    /// Where the results go; default `FILE.results.jsonl`.
    pub results: Option<PathBuf>,
    pub progress: ProgressMode,
}

/// What became of the lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub lines: u64,
    pub created: u64,
    pub replayed: u64,
    pub failed: u64,
    pub results: PathBuf,
    /// Why the stream ended before every line was answered, if it did.
    pub cut: Option<String>,
}

/// The default results file of `file`: beside it, `<name>.results.jsonl`.
pub fn default_results(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".results.jsonl");
    file.with_file_name(name)
}

/// One input line: sent to the service, or answered here.
enum Entry {
    Sent {
        line: u64,
    },
    Local {
        line: u64,
        key: Option<String>,
        error: Error,
    },
}

/// Imports `args.file`; the summary, also when lines failed. An error means the import could
/// not start (file, URL, credentials).
pub async fn run(args: ImportArgs) -> anyhow::Result<Summary> {
    let format = args.format.unwrap_or_else(|| Format::of(&args.file));
    let results_path = args
        .results
        .clone()
        .unwrap_or_else(|| default_results(&args.file));
    let total =
        count_lines(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let token = fetch_token(&args.url, &args.client_id, &args.client_secret).await?;
    let mut client = connect(&args.url).await?;

    // The reader runs on a thread of its own (file IO blocks) and hands over, in input order,
    // the entries (to pair answers with lines) and the requests (to send).
    let (entries_tx, mut entries) = mpsc::channel::<Entry>(4096);
    let (requests_tx, requests) = mpsc::channel::<CreateIssuanceRequest>(1024);
    let file = args.file.clone();
    let reader = tokio::task::spawn_blocking(move || {
        read_file(&file, format, |line, body| {
            let entry = match body.and_then(|b| request_of(&b).map_err(|e| (key_of(&b), e))) {
                Ok(request) => {
                    if requests_tx.blocking_send(request).is_err() {
                        return false;
                    }
                    Entry::Sent { line }
                }
                Err((key, error)) => Entry::Local { line, key, error },
            };
            entries_tx.blocking_send(entry).is_ok()
        })
    });
    let outbound = futures::stream::unfold(requests, |mut rx| async move {
        rx.recv().await.map(|r| (r, rx))
    });
    let mut request = tonic::Request::new(outbound);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .context("the access token is not a valid header value")?,
    );
    let mut answers = client
        .import_issuances(request)
        .await
        .map_err(|s| anyhow::anyhow!("the service refused the import: {}", s.message()))?
        .into_inner();

    let results_file = std::fs::File::create(&results_path)
        .with_context(|| format!("creating {}", results_path.display()))?;
    let mut out = std::io::BufWriter::new(results_file);
    let mut progress = Progress::new(args.progress, total);
    let mut summary = Summary {
        results: results_path.clone(),
        ..Summary::default()
    };
    let mut next_index = 0_i64;
    while let Some(entry) = entries.recv().await {
        let result = match entry {
            Entry::Local { line, key, error } => failure(line, key, &error),
            Entry::Sent { line } => match answers.next().await {
                Some(Ok(answer)) if answer.index == next_index => {
                    next_index += 1;
                    answer_line(line, answer)
                }
                Some(Ok(answer)) => {
                    summary.cut = Some(format!(
                        "the service answered item {} where {next_index} was due",
                        answer.index
                    ));
                    break;
                }
                Some(Err(status)) => {
                    summary.cut = Some(format!(
                        "the stream ended with {:?}: {}",
                        status.code(),
                        status.message()
                    ));
                    break;
                }
                None => {
                    summary.cut = Some("the stream ended before every line was answered".into());
                    break;
                }
            },
        };
        match result["status"].as_u64() {
            Some(201) => summary.created += 1,
            Some(200) => summary.replayed += 1,
            _ => summary.failed += 1,
        }
        summary.lines += 1;
        serde_json::to_writer(&mut out, &result)?;
        out.write_all(b"\n")?;
        progress.update(&summary);
    }
    out.flush()?;
    // Stop the reader (its channels close with `entries` and `answers`) and learn whether the
    // file could be read to its end.
    drop(entries);
    drop(answers);
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if summary.cut.is_none() => {
            summary.cut = Some(format!("reading {}: {e:#}", args.file.display()))
        }
        Ok(Err(_)) => {}
        Err(e) => summary.cut = Some(format!("the reader failed: {e}")),
    }
    progress.finish(&summary);
    Ok(summary)
}

/// Lines in the file, for the progress bar (CSV records may span lines: an estimate).
fn count_lines(path: &Path) -> std::io::Result<u64> {
    let mut reader = BufReader::with_capacity(1 << 16, std::fs::File::open(path)?);
    let mut n = 0;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(n);
        }
        n += buf.iter().filter(|b| **b == b'\n').count() as u64;
        let len = buf.len();
        reader.consume(len);
    }
}

/// A failed line that has a create body: its key, for the results file.
type LineError = (Option<String>, Error);

/// Reads `path`, calling `each(line, body)` per input line (blank JSONL lines skipped) until it
/// returns `false`.
fn read_file(
    path: &Path,
    format: Format,
    mut each: impl FnMut(u64, Result<Value, LineError>) -> bool,
) -> anyhow::Result<()> {
    let file = std::fs::File::open(path)?;
    match format {
        Format::Jsonl => {
            for (n, line) in BufReader::new(file).lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                let body = serde_json::from_str::<Value>(&line)
                    .map_err(|e| (None, Error::invalid_field("", format!("not JSON: {e}"))))
                    .and_then(|v| match v {
                        Value::Object(_) => Ok(v),
                        _ => Err((
                            None,
                            Error::invalid_field("", "a line must hold a JSON object"),
                        )),
                    });
                if !each(n as u64 + 1, body) {
                    break;
                }
            }
        }
        Format::Csv => {
            let mut csv = csv::ReaderBuilder::new().flexible(true).from_reader(file);
            let header: Vec<String> = csv.headers()?.iter().map(str::to_owned).collect();
            check_header(&header)?;
            for record in csv.records() {
                let record = record?;
                let line = record.position().map_or(0, |p| p.line());
                if !each(
                    line,
                    Ok(body_of_record(&header, &record)).and_then(check_width(&header, &record)),
                ) {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// A record with more cells than the header has columns is refused (its extra cells would be
/// lost); fewer cells leave the missing columns empty.
fn check_width<'a>(
    header: &'a [String],
    record: &'a csv::StringRecord,
) -> impl FnOnce(Value) -> Result<Value, LineError> + 'a {
    move |body| {
        if record.len() > header.len() {
            Err((
                key_of(&body),
                Error::invalid_field(
                    "",
                    format!(
                        "the record has {} cells, the header {} columns",
                        record.len(),
                        header.len()
                    ),
                ),
            ))
        } else {
            Ok(body)
        }
    }
}

/// Every column a dotted path of identifiers, no column twice, none both a value and a
/// parent of another (`payload` beside `payload.x`).
pub fn check_header(header: &[String]) -> anyhow::Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for column in header {
        if column.is_empty() || column.split('.').any(str::is_empty) {
            bail!("the CSV header has a column `{column}` that is not a dotted path");
        }
        if !seen.insert(column.as_str()) {
            bail!("the CSV header names `{column}` twice");
        }
    }
    for column in header {
        if let Some(child) = seen
            .iter()
            .find(|other| other.starts_with(&format!("{column}.")))
        {
            bail!("the CSV header has both `{column}` and `{child}`");
        }
    }
    Ok(())
}

/// The create body of a CSV record: each non-empty cell at its column's dotted path. A cell
/// holding a JSON array or object (`[…]`, `{…}`) is that JSON; `expires_in` is a number and
/// `tx_code` a boolean; every other cell is text.
pub fn body_of_record(header: &[String], record: &csv::StringRecord) -> Value {
    let mut body = Map::new();
    for (column, cell) in header.iter().zip(record.iter()) {
        if cell.is_empty() {
            continue;
        }
        let trimmed = cell.trim();
        let value = if (trimmed.starts_with('[') || trimmed.starts_with('{'))
            && let Ok(v) = serde_json::from_str::<Value>(trimmed)
        {
            v
        } else {
            match column.as_str() {
                "expires_in" => trimmed
                    .parse::<i64>()
                    .map(Value::from)
                    .unwrap_or_else(|_| Value::from(cell)),
                "tx_code" => match trimmed {
                    "true" => Value::Bool(true),
                    "false" => Value::Bool(false),
                    _ => Value::from(cell),
                },
                _ => Value::from(cell),
            }
        };
        let mut parts = column.split('.').peekable();
        let mut node = &mut body;
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                node.insert(part.to_owned(), value);
                break;
            }
            let child = node
                .entry(part.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            // check_header rules out a value beside its own children.
            let Value::Object(child) = child else {
                break;
            };
            node = child;
        }
    }
    Value::Object(body)
}

fn key_of(body: &Value) -> Option<String> {
    body.get("client_request_id")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// The gRPC request of a create body: the fields of `CreateIssuanceRequest`, each of its type.
/// Whether the values are right is for the service to say, as for any create.
pub fn request_of(body: &Value) -> Result<CreateIssuanceRequest, Error> {
    let Some(fields) = body.as_object() else {
        return Err(Error::invalid_field("", "a create body is a JSON object"));
    };
    let mut r = CreateIssuanceRequest::default();
    let mut wrong = Vec::new();
    for (name, value) in fields {
        let text = || value.as_str().map(str::to_owned);
        let ok = match name.as_str() {
            "client_request_id" => text().map(|v| r.client_request_id = v).is_some(),
            "credential_configuration_id" => {
                text().map(|v| r.credential_configuration_id = v).is_some()
            }
            "email" => text().map(|v| r.email = v).is_some(),
            "grant_type" => text().map(|v| r.grant_type = v).is_some(),
            "delivery" => text()
                .map(|word| {
                    match DeliveryMethod::from_str_name(&format!(
                        "DELIVERY_METHOD_{}",
                        word.to_ascii_uppercase()
                    )) {
                        Some(method) if !word.is_empty() => r.delivery_method = method as i32,
                        // The service names what is wrong with an unknown word.
                        _ => {
                            #[allow(deprecated)]
                            {
                                r.delivery = word;
                            }
                        }
                    }
                })
                .is_some(),
            "payload" => value
                .as_object()
                .map(|m| r.payload = Some(json_to_struct(m)))
                .is_some(),
            "expires_in" => value.as_i64().map(|v| r.expires_in = Some(v)).is_some(),
            "tx_code" => value.as_bool().map(|v| r.tx_code = Some(v)).is_some(),
            _ => {
                wrong.push(FieldViolation::new(name.clone(), "unknown field"));
                continue;
            }
        };
        if !ok {
            let kind = match name.as_str() {
                "payload" => "an object",
                "expires_in" => "an integer",
                "tx_code" => "a boolean",
                _ => "a string",
            };
            wrong.push(FieldViolation::new(name.clone(), format!("must be {kind}")));
        }
    }
    if wrong.is_empty() {
        Ok(r)
    } else {
        Err(Error::invalid(wrong))
    }
}

/// The results line of a line answered here.
fn failure(line: u64, key: Option<String>, error: &Error) -> Value {
    let mut v = json!({
        "line": line,
        "status": wire::status_of(error.code).as_u16(),
        "problem": wire::problem(error),
    });
    if let Some(key) = key {
        v["client_request_id"] = key.into();
    }
    v
}

/// The results line of a line the service answered.
fn answer_line(line: u64, answer: pb::ImportIssuancesResponse) -> Value {
    match answer.outcome {
        Some(Outcome::Issuance(i)) => {
            let mut v = json!({
                "line": line,
                "status": if answer.replayed { 200 } else { 201 },
                "client_request_id": i.client_request_id,
                "issuance_id": i.issuance_id,
                "credential_offer_uri": i.credential_offer_uri,
            });
            if !i.tx_code.is_empty() {
                v["tx_code"] = i.tx_code.into();
            }
            v
        }
        Some(Outcome::Error(e)) => failure(line, None, &error_of(&e)),
        None => failure(
            line,
            None,
            &Error::new(ErrorCode::Internal, "the service sent no outcome"),
        ),
    }
}

/// The domain error an item error stands for, so that the results file holds the same
/// problem object a REST create would have answered.
fn error_of(e: &pb::ItemError) -> Error {
    let code = ErrorCode::ALL
        .into_iter()
        .find(|c| c.as_str().eq_ignore_ascii_case(&e.reason))
        .unwrap_or(ErrorCode::Internal);
    let mut error = if e.field_violations.is_empty() {
        Error::new(code, e.message.clone())
    } else {
        Error::invalid(
            e.field_violations
                .iter()
                .map(|v| FieldViolation::new(v.field.clone(), v.description.clone()))
                .collect(),
        )
    };
    error.code = code;
    error.message = e.message.clone();
    error
}

/// An access token by client credentials from the service's token endpoint.
async fn fetch_token(url: &str, client_id: &str, client_secret: &str) -> anyhow::Result<String> {
    let endpoint = format!("{}/issuer/oauth/token", url.trim_end_matches('/'));
    let res = reqwest::Client::new()
        .post(&endpoint)
        .basic_auth(client_id, Some(client_secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .with_context(|| format!("reaching {endpoint}"))?;
    let status = res.status();
    let body: Value = res.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!(
            "the token endpoint refused the client credentials ({status}): {}",
            body["error_description"]
                .as_str()
                .unwrap_or("no description")
        );
    }
    body["access_token"]
        .as_str()
        .map(str::to_owned)
        .context("the token endpoint sent no access_token")
}

async fn connect(url: &str) -> anyhow::Result<IssuanceServiceClient<Channel>> {
    let mut endpoint = Channel::from_shared(url.trim_end_matches('/').to_owned())
        .with_context(|| format!("`{url}` is not a URL"))?
        .connect_timeout(Duration::from_secs(10));
    if url.starts_with("https://") {
        endpoint = endpoint.tls_config(ClientTlsConfig::new().with_webpki_roots())?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(IssuanceServiceClient::new(channel))
}

/// Progress on stderr: a bar redrawn in place, or a line every few seconds.
struct Progress {
    bar: bool,
    quiet: bool,
    total: u64,
    started: Instant,
    shown: Instant,
}

impl Progress {
    fn new(mode: ProgressMode, total: u64) -> Self {
        let bar = match mode {
            ProgressMode::Auto => std::io::stderr().is_terminal(),
            ProgressMode::Bar => true,
            ProgressMode::Lines | ProgressMode::None => false,
        };
        let now = Instant::now();
        Self {
            bar,
            quiet: mode == ProgressMode::None,
            total,
            started: now,
            shown: now,
        }
    }

    fn update(&mut self, s: &Summary) {
        let every = if self.bar {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(5)
        };
        if !self.quiet && self.shown.elapsed() >= every {
            self.shown = Instant::now();
            self.show(s, false);
        }
    }

    fn finish(&mut self, s: &Summary) {
        if !self.quiet {
            self.show(s, true);
        }
    }

    fn show(&self, s: &Summary, last: bool) {
        let total = self.total.max(s.lines);
        let rate = s.lines as f64 / self.started.elapsed().as_secs_f64().max(0.001);
        let counts = format!(
            "{}/{total} lines, {} created, {} replayed, {} failed, {rate:.0}/s",
            s.lines, s.created, s.replayed, s.failed
        );
        let mut err = std::io::stderr().lock();
        if self.bar {
            const WIDTH: u64 = 30;
            let filled = (s.lines * WIDTH).checked_div(total).unwrap_or(WIDTH) as usize;
            let _ = write!(
                err,
                "\r[{}{}] {counts}{}",
                "#".repeat(filled),
                "-".repeat(WIDTH as usize - filled.min(WIDTH as usize)),
                if last { "\n" } else { "" }
            );
        } else {
            let _ = writeln!(err, "import: {counts}");
        }
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(cells: &[&str]) -> csv::StringRecord {
        csv::StringRecord::from(cells.to_vec())
    }

    #[test]
    fn csv_cells_land_at_their_dotted_paths_with_json_where_written() {
        let header: Vec<String> = [
            "client_request_id",
            "payload.mandatee.firstName",
            "payload.mandatee.email",
            "payload.power",
            "expires_in",
            "tx_code",
            "email",
        ]
        .map(str::to_owned)
        .to_vec();
        check_header(&header).unwrap();
        let body = body_of_record(
            &header,
            &record(&[
                "k-1",
                "Ada",
                "ada@example.org",
                r#"[{"function": "Onboarding", "action": ["Execute"]}]"#,
                "3600",
                "true",
                "",
            ]),
        );
        assert_eq!(
            body,
            json!({
                "client_request_id": "k-1",
                "payload": {
                    "mandatee": {"firstName": "Ada", "email": "ada@example.org"},
                    "power": [{"function": "Onboarding", "action": ["Execute"]}],
                },
                "expires_in": 3600,
                "tx_code": true,
            }),
            "an empty cell is left out"
        );
        // Text that only looks like JSON stays text.
        let body = body_of_record(&header, &record(&["k-2", "[Ada", "", "", "soon", "", ""]));
        assert_eq!(body["payload"]["mandatee"]["firstName"], "[Ada");
        assert_eq!(body["expires_in"], "soon");
    }

    #[test]
    fn bad_headers_are_refused_before_any_line() {
        let h = |cols: &[&str]| cols.iter().map(|c| (*c).to_owned()).collect::<Vec<_>>();
        assert!(check_header(&h(&["a", "a"])).is_err());
        assert!(check_header(&h(&["payload", "payload.x"])).is_err());
        assert!(check_header(&h(&["payload..x"])).is_err());
        assert!(check_header(&h(&["", "b"])).is_err());
        assert!(check_header(&h(&["payload.x", "payload.y", "email"])).is_ok());
    }

    #[test]
    fn bodies_become_requests_and_wrong_types_name_their_field() {
        let r = request_of(&json!({
            "client_request_id": "k",
            "credential_configuration_id": "c",
            "delivery": "email",
            "email": "a@example.org",
            "payload": {"x": 1},
            "expires_in": 60,
            "tx_code": true,
        }))
        .unwrap();
        assert_eq!(r.delivery_method, DeliveryMethod::Email as i32);
        assert_eq!((r.expires_in, r.tx_code), (Some(60), Some(true)));
        assert!(r.payload.is_some());

        let e =
            request_of(&json!({"expires_in": "soon", "payload": [], "colour": "red"})).unwrap_err();
        let fields: Vec<_> = e.violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["colour", "expires_in", "payload"]);
        assert_eq!(e.code, ErrorCode::InvalidRequest);
    }

    #[test]
    fn item_errors_map_back_to_the_rest_problem() {
        let e = error_of(&pb::ItemError {
            code: tonic::Code::FailedPrecondition as i32,
            reason: "IDEMPOTENCY_KEY_REUSED".into(),
            message: "client_request_id was already used with a different request".into(),
            field_violations: vec![],
        });
        assert_eq!(e.code, ErrorCode::IdempotencyKeyReused);
        assert_eq!(wire::problem(&e)["status"], 422);
        let e = error_of(&pb::ItemError {
            code: tonic::Code::InvalidArgument as i32,
            reason: "INVALID_REQUEST".into(),
            message: "payload.mandatee.email: not an address".into(),
            field_violations: vec![pb::FieldViolation {
                field: "payload.mandatee.email".into(),
                description: "not an address".into(),
            }],
        });
        assert_eq!(
            wire::problem(&e)["errors"][0]["field"],
            "payload.mandatee.email"
        );
    }

    #[test]
    fn results_go_beside_the_input_by_default() {
        assert_eq!(
            default_results(Path::new("/data/staff.csv")),
            PathBuf::from("/data/staff.csv.results.jsonl")
        );
    }
}
