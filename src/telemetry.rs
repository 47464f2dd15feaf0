//! Logs and traces.
//!
//! Logs: JSON (default) or human-readable lines on stdout, filtered by `ISSUER_LOG_LEVEL` or
//! `RUST_LOG`; a line written inside a traced span carries its `trace_id` and `span_id`.
//!
//! Traces: OpenTelemetry spans for requests (REST and gRPC), store and Redis calls, credential
//! signing, email and webhook attempts. W3C trace context is taken from incoming `traceparent`
//! headers and gRPC metadata, and handed on to webhook receivers. Spans are exported over OTLP
//! gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set;
//! the standard `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` /
//! `OTEL_TRACES_SAMPLER_ARG` and `OTEL_BSP_*` variables apply. Without an endpoint, trace ids
//! still exist (for logs and propagation) but nothing is exported.
//!
//! Spans carry identifiers, routes, statuses and outcomes only: never payload values, email
//! addresses, tokens or secrets.

use std::fmt;

use opentelemetry::{
    Context, KeyValue,
    propagation::Extractor,
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
};
use tracing::{Event, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter,
    fmt::{
        FmtContext, FormatEvent, FormatFields,
        format::{Format, Json, JsonFields, Writer},
    },
    prelude::*,
    registry::LookupSpan,
};

use crate::config::{LogFormat, Settings};

/// The tracer provider; [`Telemetry::shutdown`] exports what is still buffered.
#[must_use = "call `shutdown` before exiting, or buffered spans are lost"]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Flushes and stops the exporter (blocking, bounded by the SDK's timeout), off the async
    /// runtime's threads.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    }
}

/// Whether the standard OTLP variables ask for trace export.
fn otlp_endpoint_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|v| !v.trim().is_empty()))
}

/// Where log lines go: the service logs to stdout; one-shot commands log to stderr, so that
/// their stdout holds only their output (e.g. `--output json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTo {
    Stdout,
    Stderr,
}

/// Builds the tracer provider (exporting when configured) and installs the global subscriber.
/// Must run inside the Tokio runtime: the OTLP exporter's channel lives there.
pub fn init(settings: &Settings, log_to: LogTo) -> anyhow::Result<Telemetry> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // `Resource::builder` reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; the name
    // falls back to "issuer" rather than `unknown_service`.
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("issuer");
    }
    let resource = resource
        .with_attributes([KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))])
        .build();
    // The sampler comes from OTEL_TRACES_SAMPLER / _ARG (default: parent-based, always on).
    let mut provider = SdkTracerProvider::builder().with_resource(resource);
    let exporting = otlp_endpoint_configured();
    if !exporting && std::env::var_os("OTEL_TRACES_SAMPLER").is_none() {
        // Nothing to export to: record only what a caller asked to sample. Trace ids still
        // exist for logs and propagation; our own traces go on marked "not sampled".
        provider = provider.with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)));
    }
    if exporting {
        // The exporter reads the endpoint, headers, timeout and compression from the
        // standard OTEL_EXPORTER_OTLP_* variables.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?;
        provider = provider.with_batch_exporter(exporter);
    }
    let provider = provider.build();

    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.log_level));
    // Spans reach the tracer whatever the log level: a quiet log must not blind the traces.
    // Store and Redis spans only as children: the background loops' polling (claims, the
    // readiness ping) would otherwise start a trace every second.
    // The decision is made once per callsite where it can be: a callsite judged per event costs
    // every event of it (h2 alone has hundreds), even disabled ones.
    let ours = |meta: &tracing::Metadata<'_>| {
        meta.target().starts_with("issuer") && *meta.level() <= tracing::Level::INFO
    };
    let only_as_child = |meta: &tracing::Metadata<'_>| {
        meta.is_span()
            && (meta.target().starts_with("issuer_store")
                || meta.target().starts_with("issuer_coordination"))
    };
    let traced = tracing_subscriber::filter::DynFilterFn::new(move |meta, cx| {
        ours(meta) && (!only_as_child(meta) || cx.lookup_current().is_some())
    })
    .with_max_level_hint(tracing_subscriber::filter::LevelFilter::INFO)
    .with_callsite_filter(move |meta| {
        if !ours(meta) {
            tracing::subscriber::Interest::never()
        } else if only_as_child(meta) {
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::always()
        }
    });
    let traces = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("issuer"))
        .with_filter(traced);
    let registry = tracing_subscriber::registry().with(traces);
    let writer = move || -> Box<dyn std::io::Write> {
        match log_to {
            LogTo::Stdout => Box::new(std::io::stdout()),
            LogTo::Stderr => Box::new(std::io::stderr()),
        }
    };
    match settings.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .fmt_fields(JsonFields::new())
                    .event_format(WithTraceIds(
                        tracing_subscriber::fmt::format()
                            .json()
                            .flatten_event(true)
                            .with_current_span(false)
                            .with_span_list(false),
                    ))
                    .with_filter(filter),
            )
            .try_init()?,
        LogFormat::Pretty => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .with_filter(filter),
            )
            .try_init()?,
    }
    Ok(Telemetry { provider })
}

/// The JSON log format plus `trace_id` and `span_id` of the span the event happened in.
struct WithTraceIds(Format<Json>);

impl<S, N> FormatEvent<S, N> for WithTraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Entering a traced span makes its context current on this thread.
        let ids = Context::map_current(|cx| {
            let span = cx.span();
            let sc = span.span_context();
            sc.is_valid().then(|| (sc.trace_id(), sc.span_id()))
        });
        let Some((trace_id, span_id)) = ids else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::with_capacity(256);
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.trim_end().strip_suffix('}') {
            Some(head) => {
                let sep = if head.ends_with('{') { "" } else { "," };
                writeln!(
                    writer,
                    "{head}{sep}\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"}}"
                )
            }
            None => writer.write_str(&line),
        }
    }
}

/// Reads W3C trace context from HTTP headers; gRPC metadata are HTTP/2 headers too.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Makes `span` a child of the trace context in `headers`, if they carry a valid one.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    join(span, &HeaderExtractor(headers));
}

/// Makes `span` a child of a stored `traceparent` (e.g. of the request that queued a webhook).
pub fn continue_stored_trace(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(tp) = traceparent {
        join(
            span,
            &std::collections::HashMap::from([("traceparent".to_owned(), tp.to_owned())]),
        );
    }
}

fn join(span: &tracing::Span, carrier: &dyn Extractor) {
    // A span that is not traced (probes, tests without telemetry) has nothing to join.
    if span.is_disabled() {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract_with_context(&Context::new(), carrier)
    });
    if parent.span().span_context().is_valid() {
        // Fails only when no tracing layer is installed: nothing to join then either.
        let _ = span.set_parent(parent);
    }
}

/// The W3C `traceparent` of a span, if it is traced.
pub use issuer_store::traceparent;
