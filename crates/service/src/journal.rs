//! Log lines for the systemd journal. When stdout is the journal's stream
//! (systemd sets `JOURNAL_STREAM` to its device and inode), each event is one line
//! that starts with its syslog priority (`<3>` error … `<7>` debug, as sd-daemon(3)
//! describes), without a timestamp (the journal stamps each entry) and without
//! colour, so `journalctl -p warning` filters by level. Elsewhere the text and JSON
//! formats are untouched.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// How log lines are written (`log.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// True when stdout is the journal stream systemd announced in `JOURNAL_STREAM`
/// (not merely inherited by a process whose stdout goes elsewhere).
pub fn connected() -> bool {
    let Ok(announced) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    stdout_identity().is_some_and(|(dev, ino)| names_stream(&announced, dev, ino))
}

/// Device and inode of stdout.
fn stdout_identity() -> Option<(u64, u64)> {
    use std::os::fd::AsFd as _;
    use std::os::unix::fs::MetadataExt as _;
    let fd = std::io::stdout().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Whether `JOURNAL_STREAM` (`DEVICE:INODE`, decimal) names this device and inode.
fn names_stream(announced: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = announced.trim().split_once(':') else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

/// The syslog priority of a level: error 3, warning 4, info 6, debug and trace 7.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// The formatting layer for the journal (on stdout), in the configured format.
pub fn layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    layer_writing_to(format, std::io::stdout)
}

fn layer_writing_to<S, W>(format: LogFormat, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let base = tracing_subscriber::fmt::format()
        .without_time()
        .with_ansi(false);
    match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(writer)
            .event_format(JournalFormat(base.with_level(false)))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(writer)
            .event_format(JournalFormat(
                base.json().flatten_event(true).with_current_span(true),
            ))
            .boxed(),
    }
}

/// Puts the priority before what the inner format writes, and keeps the event on
/// one line: the journal starts a new entry (at the default priority) at every
/// newline, so newlines inside a message are written as `\n`.
pub struct JournalFormat<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for JournalFormat<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let line = line.trim_end_matches('\n');
        writeln!(
            writer,
            "<{}>{}",
            priority(event.metadata().level()),
            line.replace('\n', "\\n")
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    /// Collects what the layer writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The lines `format` writes for one event of each level, a field, a span and
    /// a message with a newline in it.
    fn lines(format: LogFormat) -> Vec<String> {
        let captured = Captured::default();
        let writer = captured.clone();
        let layer = layer_writing_to(format, move || writer.clone());
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::filter::LevelFilter::TRACE)
            .with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("rpc", method = "CheckSeat");
            let _entered = span.enter();
            tracing::error!(part = "license file", "reload failed");
            tracing::warn!("redis slow");
            tracing::info!("serving");
            tracing::debug!("detail");
            tracing::trace!("more detail");
            tracing::warn!("first line\nsecond line");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn text_lines_start_with_the_priority_and_carry_no_time_colour_or_level() {
        let lines = lines(LogFormat::Text);
        assert_eq!(lines.len(), 6, "one line per event: {lines:#?}");
        let prefixes: Vec<&str> = lines.iter().map(|l| &l[..3]).collect();
        assert_eq!(prefixes, ["<3>", "<4>", "<6>", "<7>", "<7>", "<4>"]);
        assert_eq!(
            lines[0],
            "<3>rpc{method=\"CheckSeat\"}: comtrexx_licensing::journal::tests: reload failed part=\"license file\""
        );
        assert_eq!(
            lines[5],
            "<4>rpc{method=\"CheckSeat\"}: comtrexx_licensing::journal::tests: first line\\nsecond line"
        );
        for line in &lines {
            assert!(!line.contains('\u{1b}'), "no ANSI colour: {line:?}");
            assert!(!line.contains("WARN") && !line.contains("INFO"), "{line}");
        }
    }

    #[test]
    fn json_lines_start_with_the_priority_and_carry_no_timestamp() {
        let lines = lines(LogFormat::Json);
        assert_eq!(lines.len(), 6, "one line per event: {lines:#?}");
        assert!(lines[0].starts_with("<3>{"), "{}", lines[0]);
        let event: serde_json::Value = serde_json::from_str(&lines[0][3..]).unwrap();
        assert_eq!(event["level"], "ERROR");
        assert_eq!(event["message"], "reload failed");
        assert_eq!(event["part"], "license file");
        assert_eq!(event["span"]["method"], "CheckSeat");
        assert!(event.get("timestamp").is_none(), "{event}");
        let multi: serde_json::Value = serde_json::from_str(&lines[5][3..]).unwrap();
        assert_eq!(multi["message"], "first line\nsecond line");
    }

    #[test]
    fn journal_stream_must_name_stdout() {
        assert!(names_stream("8:12345", 8, 12345));
        assert!(names_stream("8:12345\n", 8, 12345));
        assert!(!names_stream("8:12346", 8, 12345));
        assert!(!names_stream("9:12345", 8, 12345));
        assert!(!names_stream("garbage", 8, 12345));
        assert!(!names_stream("", 8, 12345));
    }

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
        assert_eq!(priority(&Level::TRACE), 7);
    }
}
