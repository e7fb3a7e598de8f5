//! What `square-client` does once its arguments and configuration are
//! resolved: square the numbers given (or every line of standard input),
//! print the squares, report failures on stderr, and choose the exit status.

use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::process::ExitCode;

use common::cli::{EXIT_CONFIG, EXIT_FAILED, EXIT_UNAVAILABLE};

use crate::settings::Settings;
use crate::{Client, Reply, SquareError, StreamOptions, Summary};

/// The program's name: configuration prefix `SQUARE_CLIENT_`.
pub const PROGRAM: &str = "square-client";

/// How answers are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One square per line; failures on stderr.
    Plain,
    /// One JSON object per request on stdout: `{"input":"12","square":"144"}`
    /// or `{"input":"x","error":"..."}`.
    Json,
}

/// Squares `numbers`, or each line of standard input when there are none,
/// and returns the exit status: 0 when every number was squared, 1 when
/// any was refused, 64 for a usage or configuration error, 69 when the
/// server is unreachable, fails the TLS handshake, or leaves requests
/// unanswered for the reply timeout.
pub async fn run(settings: &Settings, numbers: Vec<String>, format: Format) -> ExitCode {
    let (input, options): (Box<dyn tokio::io::AsyncRead + Unpin + Send>, _) = if numbers.is_empty()
    {
        (Box::new(tokio::io::stdin()), StreamOptions::default())
    } else {
        if let Some(bad) = numbers.iter().find(|n| n.contains(['\n', '\r'])) {
            common::telemetry::say(format_args!(
                "{PROGRAM}: the argument {bad:?} holds a line break; give one number per argument"
            ));
            return ExitCode::from(EXIT_CONFIG);
        }
        let mut joined = numbers.join("\n");
        joined.push('\n');
        // An argument is a request even when blank: the server says why not.
        let options = StreamOptions {
            skip_blank_lines: false,
            ..StreamOptions::default()
        };
        (Box::new(std::io::Cursor::new(joined.into_bytes())), options)
    };

    let server = match settings.server_address() {
        Ok(server) => server.to_string(),
        Err(e) => {
            common::telemetry::say(format_args!("{PROGRAM}: {e}"));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Checked at start already; read again here, so a file changed since
    // is caught too.
    let connector = match settings.connector() {
        Ok(connector) => connector,
        Err(e) => {
            common::telemetry::say(format_args!("{PROGRAM}: invalid configuration: {e}"));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let timeout = settings.connect_timeout.0;
    let connected = match &connector {
        None => Client::connect_timeout(&server, timeout)
            .await
            .map(|client| converse(client, settings, input, options, format)),
        Some(connector) => Client::connect_tls(&server, timeout, connector)
            .await
            .map(|client| converse(client, settings, input, options, format)),
    };
    let result = match connected {
        // Boxed: the two kinds of connection make two futures.
        Ok(conversation) => conversation.await,
        Err(e @ SquareError::Handshake { .. }) => {
            let hint = tls_hint(&e).map_or(String::new(), |hint| format!(" ({hint})"));
            common::telemetry::say(format_args!("{PROGRAM}: {e}{hint}"));
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
        Err(e) => {
            common::telemetry::say(format_args!(
                "{PROGRAM}: {e}; start square-server there, or give another address with --server or SQUARE_CLIENT_SERVER"
            ));
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    match result {
        Ok(summary) if summary.rejected == 0 => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(EXIT_FAILED),
        Err(SquareError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            // The reader of our output has gone (`| head`): nothing to say.
            ExitCode::from(EXIT_FAILED)
        }
        Err(e @ SquareError::Connection(_)) => {
            let hint = tls_hint(&e).map_or(String::new(), |hint| format!("; {hint}"));
            common::telemetry::say(format_args!("{PROGRAM}: {e} (at {server}{hint})"));
            ExitCode::from(EXIT_UNAVAILABLE)
        }
        Err(SquareError::NoAnswer { waited }) => {
            common::telemetry::say(format_args!(
                "{PROGRAM}: the square server at {server} sent no answer for {}; check that square-server \
                 is what listens there and that it is not overloaded, or wait longer with --reply-timeout \
                 or SQUARE_CLIENT_REPLY_TIMEOUT",
                humantime::format_duration(waited)
            ));
            ExitCode::from(EXIT_UNAVAILABLE)
        }
        Err(e) => {
            common::telemetry::say(format_args!("{PROGRAM}: {e}"));
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// Streams `input` through `client`, printing the answers.
fn converse<S>(
    client: Client<S>,
    settings: &Settings,
    input: Box<dyn tokio::io::AsyncRead + Unpin + Send>,
    options: StreamOptions,
    format: Format,
) -> Pin<Box<dyn Future<Output = Result<Summary, SquareError>> + '_>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let client = client.with_reply_timeout(settings.reply_timeout.0);
    Box::pin(async move {
        let mut stdout = tokio::io::stdout();
        client
            .stream(input, &mut stdout, options, |reply, out| {
                print_reply(format, reply, out)
            })
            .await
    })
}

/// What to do when TLS is why the connection failed (an untrusted
/// server certificate, or a server that refused the client's certificate,
/// or its absence), with the flags that may fix it.
fn tls_hint(e: &SquareError) -> Option<String> {
    let (SquareError::Connection(e) | SquareError::Handshake { source: e, .. }) = e else {
        return None;
    };
    let hint = common::tls::client::hint(e)?;
    let flags: Vec<String> = hint
        .settings()
        .iter()
        .map(|s| common::config::flag_name(s))
        .collect();
    Some(match flags.as_slice() {
        [] => hint.to_string(),
        flags => format!("{hint}, with {}", flags.join(" and ")),
    })
}

/// Appends one answer to `out` (stdout), or reports a refusal on stderr.
pub fn print_reply(format: Format, reply: Reply<'_>, out: &mut Vec<u8>) {
    match (format, reply.answer) {
        (Format::Plain, Ok(square)) => {
            out.extend_from_slice(square.as_bytes());
            out.push(b'\n');
        }
        (Format::Plain, Err(reason)) => {
            // The server's reason names the input (quoted, shortened).
            let _ = writeln!(std::io::stderr().lock(), "{PROGRAM}: {reason}");
        }
        (Format::Json, answer) => {
            let mut input = String::from_utf8_lossy(reply.input).into_owned();
            if reply.input_truncated {
                input.push_str("...");
            }
            out.extend_from_slice(b"{\"input\":");
            json_string(&input, out);
            match answer {
                Ok(square) => {
                    // A square is digits and at most one point: no escaping.
                    out.extend_from_slice(b",\"square\":\"");
                    out.extend_from_slice(square.as_bytes());
                    out.extend_from_slice(b"\"}\n");
                }
                Err(reason) => {
                    out.extend_from_slice(b",\"error\":");
                    json_string(reason, out);
                    out.extend_from_slice(b"}\n");
                }
            }
        }
    }
}

fn json_string(s: &str, out: &mut Vec<u8>) {
    serde_json::to_writer(out, s).expect("a string always serializes");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn printed(format: Format, input: &str, answer: Result<&str, &str>) -> String {
        let mut out = Vec::new();
        let reply = Reply {
            input: input.as_bytes(),
            input_truncated: false,
            answer,
        };
        print_reply(format, reply, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn plain_and_json_lines() {
        assert_eq!(printed(Format::Plain, "12", Ok("144")), "144\n");
        assert_eq!(printed(Format::Plain, "x", Err("nope")), "");
        assert_eq!(
            printed(Format::Json, "12", Ok("144")),
            "{\"input\":\"12\",\"square\":\"144\"}\n"
        );
        let line = printed(Format::Json, "a\"b", Err("\"a\\\"b\" is not a number"));
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["input"], "a\"b");
        assert_eq!(value["error"], "\"a\\\"b\" is not a number");
    }
}
