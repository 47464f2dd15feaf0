//! Thin entry point: parse the command line, load settings, then serve or provision.

use anyhow::Context;
use clap::Parser;
use issuer::{
    App, Settings, admin,
    cli::{Cli, ClientCommand, Command, ImportCommand, Output, TenantCommand},
};
use issuer_domain::ids::TenantId;
use serde_json::json;
use std::process::ExitCode;

/// mimalloc: the request path allocates many small JSON values, which glibc's allocator serves
/// measurably slower (see the create benchmark).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let settings = Settings::load(cli.config)?;
    let command = cli.command.unwrap_or(Command::Serve);
    let log_to = match command {
        Command::Serve => issuer::telemetry::LogTo::Stdout,
        _ => issuer::telemetry::LogTo::Stderr,
    };
    let telemetry = issuer::telemetry::init(&settings, log_to)?;
    if let Command::Import(args) = command {
        let code = import(args).await;
        telemetry.shutdown().await;
        return Ok(code);
    }
    let result = run_command(command, settings).await;
    telemetry.shutdown().await;
    result.map(|()| ExitCode::SUCCESS)
}

/// `issuer import`: the summary as JSON on stdout; the exit status tells complete (0), some
/// lines failed (1), or not run / cut short (2).
async fn import(args: ImportCommand) -> ExitCode {
    let summary = issuer::import::run(issuer::import::ImportArgs {
        file: args.file,
        format: args.format,
        url: args.url,
        client_id: args.client_id,
        client_secret: args.client_secret,
        results: args.results,
        progress: args.progress,
    })
    .await;
    match summary {
        Ok(s) => {
            println!(
                "{}",
                json!({
                    "lines": s.lines,
                    "created": s.created,
                    "replayed": s.replayed,
                    "failed": s.failed,
                    "results": s.results.display().to_string(),
                    "cut": s.cut,
                })
            );
            if let Some(why) = &s.cut {
                eprintln!("import cut short: {why}; run it again: done lines come back as replays");
                ExitCode::from(2)
            } else if s.failed > 0 {
                eprintln!(
                    "{} of {} lines failed; see {}",
                    s.failed,
                    s.lines,
                    s.results.display()
                );
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("import did not run: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run_command(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Serve => {
            let listener = tokio::net::TcpListener::bind(settings.listen_addr)
                .await
                .with_context(|| format!("binding {}", settings.listen_addr))?;
            issuer::run(settings, listener, shutdown_signal()).await
        }
        Command::Migrate => {
            issuer::app::connect_store(&settings, true).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Tenant(TenantCommand::Create { name, output }) => {
            let app = provisioning_app(settings).await?;
            let tenant = admin::create_tenant(&app, &name)
                .await
                .map_err(|e| anyhow::anyhow!(e.chain()))?;
            print(
                output,
                json!({"tenant_id": tenant.id.to_string(), "name": tenant.name}),
            );
            Ok(())
        }
        Command::Tenant(TenantCommand::Brand {
            tenant,
            display_name,
            logo_url,
            support_contact,
            output,
        }) => {
            let app = provisioning_app(settings).await?;
            let tenant = parse_tenant(&tenant)?;
            let branding = issuer_domain::model::Branding {
                display_name,
                logo_url,
                support_contact,
            };
            admin::brand_tenant(&app, tenant, branding.clone())
                .await
                .map_err(|e| anyhow::anyhow!(e.chain()))?;
            print(
                output,
                json!({
                    "tenant_id": tenant.to_string(),
                    "display_name": branding.display_name,
                    "logo_url": branding.logo_url,
                    "support_contact": branding.support_contact,
                }),
            );
            Ok(())
        }
        Command::Tenant(TenantCommand::Limits {
            tenant,
            per_sec,
            burst,
            clear: _,
            output,
        }) => {
            let app = provisioning_app(settings).await?;
            let tenant = parse_tenant(&tenant)?;
            let limit = per_sec
                .map(|per_sec| {
                    issuer_domain::model::RateLimit::new(
                        per_sec,
                        burst.unwrap_or(per_sec.saturating_mul(2)),
                    )
                })
                .transpose()
                .map_err(anyhow::Error::msg)?;
            admin::limit_tenant(&app, tenant, limit)
                .await
                .map_err(|e| anyhow::anyhow!(e.chain()))?;
            print(
                output,
                json!({
                    "tenant_id": tenant.to_string(),
                    "rate_limit": limit.map(|l| json!({"per_sec": l.per_sec, "burst": l.burst})),
                }),
            );
            Ok(())
        }
        Command::Client(ClientCommand::Create {
            tenant,
            scopes,
            output,
        }) => {
            let app = provisioning_app(settings).await?;
            let creds = admin::create_client(&app, parse_tenant(&tenant)?, &scopes.0)
                .await
                .map_err(|e| anyhow::anyhow!(e.chain()))?;
            print(output, serde_json::to_value(creds)?);
            Ok(())
        }
        Command::Client(ClientCommand::RotateSecret {
            tenant,
            client,
            output,
        }) => {
            let app = provisioning_app(settings).await?;
            let creds = admin::rotate_secret(&app, parse_tenant(&tenant)?, &client)
                .await
                .map_err(|e| anyhow::anyhow!(e.chain()))?;
            print(output, serde_json::to_value(creds)?);
            Ok(())
        }
        Command::Import(_) => unreachable!("run by main"),
    }
}

async fn provisioning_app(settings: Settings) -> anyhow::Result<App> {
    App::build(Settings {
        migrate_on_start: true,
        ..settings
    })
    .await
}

fn parse_tenant(s: &str) -> anyhow::Result<TenantId> {
    s.parse()
        .map_err(|_| anyhow::anyhow!("--tenant must be a tenant id (a UUID)"))
}

fn print(output: Output, value: serde_json::Value) {
    match output {
        Output::Json => println!("{value}"),
        Output::Text => {
            if let Some(obj) = value.as_object() {
                for (k, v) in obj {
                    println!(
                        "{k}: {}",
                        v.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| v.to_string())
                    );
                }
            }
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
