//! The command line: `serve` (default), `migrate`, tenant / client provisioning, and `import`
//! (a bulk import through a running service).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use issuer_domain::model::Scope;

#[derive(Debug, Parser)]
#[command(
    name = "issuer",
    version,
    about = "Verifiable credential issuer (OID4VCI 1.0, SD-JWT VC)"
)]
pub struct Cli {
    /// TOML settings file (also `ISSUER_CONFIG`); `ISSUER_*` environment variables override it.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve REST and gRPC (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage API clients.
    #[command(subcommand)]
    Client(ClientCommand),
    /// Create the offers of a JSONL or CSV file through a running service (gRPC
    /// `ImportIssuances`), writing one result line per input line. Exit status: 0 when every
    /// line was created or replayed, 1 when some failed (the results file says which and why),
    /// 2 when the import could not run or was cut short. Running it again is safe.
    Import(ImportCommand),
}

#[derive(Debug, clap::Args)]
pub struct ImportCommand {
    /// The input: JSONL (one create body per line) or CSV (a header of dotted paths such as
    /// `payload.mandatee.firstName`; a cell holding a JSON array or object is that JSON).
    pub file: PathBuf,
    /// `jsonl` or `csv`; by default from the file name (`.csv` is CSV, anything else JSONL).
    #[arg(long, value_enum)]
    pub format: Option<crate::import::Format>,
    /// The service's base URL.
    #[arg(long, env = "ISSUER_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The API client (scope `issuance:write`).
    #[arg(long, env = "ISSUER_CLIENT_ID")]
    pub client_id: String,
    /// Its secret; set it in the environment rather than on the command line.
    #[arg(long, env = "ISSUER_CLIENT_SECRET", hide_env_values = true)]
    pub client_secret: String,
    /// Where the results go (default: `FILE.results.jsonl`).
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// `auto` (a bar on a terminal, plain lines otherwise), `bar`, `lines` or `none`.
    #[arg(long, value_enum, default_value_t = crate::import::ProgressMode::Auto)]
    pub progress: crate::import::ProgressMode,
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Set how the tenant appears to recipients, in offer emails and on the landing page.
    /// Replaces all three fields; an omitted one is cleared.
    Brand {
        #[arg(long)]
        tenant: String,
        /// The organisation's name as recipients know it (default: the tenant name).
        #[arg(long)]
        display_name: Option<String>,
        /// An https URL of the organisation's logo.
        #[arg(long)]
        logo_url: Option<String>,
        /// Where recipients get help: an email address or an https URL.
        #[arg(long)]
        support_contact: Option<String>,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Give each of the tenant's API clients its own rate limit instead of the service default
    /// (`ISSUER_RATE_LIMIT_CLIENT_*`), or with `--clear` return to the default.
    Limits {
        #[arg(long)]
        tenant: String,
        /// Sustained requests per second of each client.
        #[arg(long, required_unless_present = "clear")]
        per_sec: Option<u32>,
        /// Requests a client may make at once (default: twice the rate).
        #[arg(long, requires = "per_sec")]
        burst: Option<u32>,
        #[arg(long, conflicts_with_all = ["per_sec", "burst"])]
        clear: bool,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Create an API client; its secret is printed only this once.
    Create {
        #[arg(long)]
        tenant: String,
        /// Comma-separated: issuance:write, issuance:read, webhooks:manage.
        #[arg(long, value_parser = parse_scopes)]
        scopes: ScopeList,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Replace a client's secret; the old one stops working at once.
    RotateSecret {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        client: String,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct ScopeList(pub Vec<Scope>);

fn parse_scopes(s: &str) -> Result<ScopeList, String> {
    Scope::parse_list(s).map(ScopeList)
}
