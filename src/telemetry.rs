//! Logs: JSON for machines, pretty for people; `RUST_LOG` wins over `log.level`.
//! Traces: exported over OTLP/HTTP (protobuf) only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; unset, no exporter is built, no request
//! carries a `traceparent`, and log lines stay as they were.

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::{Deserialize, Serialize};
use tracing::Subscriber;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// `[log]`: the format and level of the log lines.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

/// An exporter the variable that asked for it cannot have. Exits 64, like a bad key.
#[derive(Debug, thiserror::Error)]
#[error("configuration key `{var}`: cannot export traces: {message}")]
pub struct ExporterError {
    pub var: &'static str,
    pub message: String,
}

/// The variables that turn the exporter on (the OpenTelemetry SDK's own names).
const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
];

/// A duration in whole milliseconds, for log fields and clocks kept in an integer
/// (saturating: no real duration gets near `u64::MAX` ms).
pub fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Colour only for a person at a terminal, and never when `NO_COLOR` is set
/// (<https://no-color.org>): escape codes in a journal or a log file are noise.
pub fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The span exporter, kept so the spans still buffered are sent when the process ends:
/// dropping it flushes them (a `run --once`, or a daemon stopped by SIGTERM, lives for less
/// than the batch processor's 5 s export delay).
#[must_use = "dropping it flushes and stops the span exporter"]
pub struct Traces(Option<SdkTracerProvider>);

impl Drop for Traces {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("imprint-sync: exporting the last spans failed: {e}");
        }
    }
}

/// Installs the global subscriber. Logs go to stderr; stdout is for command output.
///
/// An endpoint the exporter cannot use is a configuration error naming the variable; the
/// logs are installed all the same, so the caller can still report it.
pub fn init(log: &LogSettings) -> Result<Traces, ExporterError> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(colour())
        .with_writer(std::io::stderr);
    let fmt = match log.format {
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .map_event_format(WithTraceId)
            .boxed(),
        LogFormat::Pretty => fmt.compact().boxed(),
    };
    let (provider, error) = match exporter() {
        Ok(p) => (p, None),
        Err(e) => (None, Some(e)),
    };
    // The log filter is the fmt layer's own, so `log.level = "warn"` does not silence the
    // spans; the traces take this crate's spans and events at info and above.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("imprint-sync"))
            .with_filter(Targets::new().with_target("imprint_sync", LevelFilter::INFO))
    });
    // A second init (tests, the demo) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
    match error {
        Some(e) => Err(e),
        None => Ok(Traces(provider)),
    }
}

/// The tracer provider, when an endpoint is configured.
fn exporter() -> Result<Option<SdkTracerProvider>, ExporterError> {
    let Some(var) = ENDPOINT_VARS
        .into_iter()
        .find(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
    else {
        return Ok(None);
    };
    // The SDK reads the endpoint (appending /v1/traces to the generic one), headers,
    // timeout and protocol from the standard OTEL_EXPORTER_OTLP_* variables.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| ExporterError {
            var,
            message: e.to_string(),
        })?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("imprint-sync");
    }
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    ))
}

/// The W3C `traceparent` of the current span, or `None` when no span is being exported
/// (no endpoint configured): then nothing is added to requests.
pub fn traceparent() -> Option<String> {
    let cx = opentelemetry::Context::current();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// The JSON line with `trace_id` and `span_id` first, when an exported span is current, so
/// a log line leads to its trace.
struct WithTraceId<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceId<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let cx = opentelemetry::Context::current();
        let span = cx.span();
        let sc = span.span_context();
        if !sc.is_valid() {
            return self.0.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(
                writer,
                "{{\"trace_id\":\"{}\",\"span_id\":\"{}\",{rest}",
                sc.trace_id(),
                sc.span_id()
            ),
            None => writer.write_str(&line),
        }
    }
}
