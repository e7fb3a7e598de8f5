//! The client library against a real square server on port 0: single
//! requests, pipelined streams (large, with refusals, with tiny windows),
//! and the failures a caller must be able to tell apart.

use std::time::Duration;

use common::settings::Period;
use square_client::{Client, Reply, SquareError, StreamOptions, Summary};
use tokio::net::TcpListener;

async fn server(settings: square_server::Settings) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(square_server::run(
        listener,
        settings,
        std::future::pending(),
    ));
    addr
}

/// Streams `input` and returns what was printed per reply:
/// `square` or `!input!reason`.
async fn stream(
    addr: &str,
    input: Vec<u8>,
    options: StreamOptions,
) -> (Result<Summary, SquareError>, Vec<String>) {
    let client = Client::connect(addr).await.unwrap();
    let mut output = Vec::new();
    let result = client
        .stream(
            std::io::Cursor::new(input),
            &mut output,
            options,
            |reply: Reply<'_>, out: &mut Vec<u8>| match reply.answer {
                Ok(square) => out.extend_from_slice(format!("{square}\n").as_bytes()),
                Err(reason) => out.extend_from_slice(
                    format!("!{}!{reason}\n", String::from_utf8_lossy(reply.input)).as_bytes(),
                ),
            },
        )
        .await;
    let lines = String::from_utf8(output)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    (result, lines)
}

#[tokio::test]
async fn one_square_at_a_time() {
    let addr = server(square_server::Settings::default()).await;
    let mut client = Client::connect(&addr).await.unwrap();
    assert_eq!(client.square("12").await.unwrap(), "144");
    match client.square("twelve").await {
        Err(SquareError::Rejected { input, reason }) => {
            assert_eq!(input, "twelve");
            assert!(reason.starts_with("\"twelve\" is not a number"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        client.square("1\n2").await,
        Err(SquareError::InvalidRequest { .. })
    ));
    assert_eq!(client.square("-1.5").await.unwrap(), "2.25");
}

#[tokio::test]
async fn an_unreachable_server_is_named() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let err = Client::connect(&addr).await.unwrap_err();
    assert!(matches!(err, SquareError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains(&addr), "{err}");
}

#[tokio::test]
async fn a_large_stream_is_answered_in_order() {
    let addr = server(square_server::Settings::default()).await;
    let mut input = String::new();
    let mut expected = Vec::new();
    for i in 0..200_000u64 {
        match i % 50_000 {
            3 => {
                input.push_str("bad\n");
                expected.push(
                    "!bad!\"bad\" is not a number; send an integer or a decimal such as -12 or 1.5"
                        .to_string(),
                );
            }
            4 => input.push_str("   \r\n"),
            _ => {
                input.push_str(&format!("{i}.5\r\n"));
                expected.push(format!("{}.25", i * i + i));
            }
        }
    }
    let (result, lines) = stream(&addr, input.into_bytes(), StreamOptions::default()).await;
    let summary = result.unwrap();
    assert_eq!(summary.rejected, 4);
    assert_eq!(summary.squared, 200_000 - 8);
    assert_eq!(lines.len(), expected.len());
    for (got, want) in lines.iter().zip(&expected) {
        assert_eq!(got, want);
    }
}

#[tokio::test]
async fn a_tiny_window_still_gets_through() {
    let addr = server(square_server::Settings::default()).await;
    let input: String = (0..2000).map(|i| format!("{i}\n")).collect();
    let options = StreamOptions {
        batch_bytes: 8,
        max_batches: 1,
        skip_blank_lines: true,
    };
    let (result, lines) = stream(&addr, input.into_bytes(), options).await;
    assert_eq!(result.unwrap().squared, 2000);
    assert_eq!(lines[1999], (1999 * 1999).to_string());
}

#[tokio::test]
async fn a_line_longer_than_a_batch_is_refused_by_the_server() {
    let settings = square_server::Settings {
        max_line: 1000,
        ..square_server::Settings::default()
    };
    let addr = server(settings).await;
    let mut input = b"2\n".to_vec();
    input.extend(std::iter::repeat_n(b'1', 5000));
    input.extend_from_slice(b"\n3\n");
    let options = StreamOptions {
        batch_bytes: 100,
        ..StreamOptions::default()
    };
    let (result, lines) = stream(&addr, input, options).await;
    assert_eq!(result.unwrap().rejected, 1);
    assert_eq!(lines[0], "4");
    assert!(
        lines[1].starts_with(&format!("!{}!line too long", "1".repeat(64))),
        "{}",
        lines[1]
    );
    assert_eq!(lines[2], "9");
}

#[tokio::test]
async fn the_server_closing_early_is_a_connection_error() {
    let mut settings = square_server::Settings::default();
    settings.serve.idle_timeout = Period::from_millis(200);
    let addr = server(settings).await;
    let client = Client::connect(&addr).await.unwrap();
    // An input that never ends: the server gives up on the idle connection.
    let (input, mut typing) = tokio::io::duplex(64);
    tokio::io::AsyncWriteExt::write_all(&mut typing, b"5\n")
        .await
        .unwrap();
    let mut output = Vec::new();
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        client.stream(input, &mut output, StreamOptions::default(), |r, out| {
            out.extend_from_slice(r.answer.unwrap().as_bytes())
        }),
    )
    .await
    .expect("the stream ends when the server closes");
    assert!(
        matches!(result, Err(SquareError::Connection(_))),
        "{result:?}"
    );
    assert_eq!(output, b"25");
}

/// A listener that accepts and never answers (nor reads): its address, and
/// the task holding the connections.
async fn silent() -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (addr, holder)
}

#[tokio::test]
async fn a_server_that_never_answers_is_given_up() {
    let (addr, holder) = silent().await;
    let timeout = Duration::from_millis(300);
    let mut client = Client::connect(&addr)
        .await
        .unwrap()
        .with_reply_timeout(timeout);
    let asked = tokio::time::Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(10), client.square("12"))
        .await
        .expect("square() gives up by itself");
    assert!(
        matches!(result, Err(SquareError::NoAnswer { waited }) if waited == timeout),
        "{result:?}"
    );
    assert!(asked.elapsed() >= timeout);
    assert_eq!(
        result.unwrap_err().to_string(),
        "the square server sent no answer for 300ms"
    );

    let client = Client::connect(&addr)
        .await
        .unwrap()
        .with_reply_timeout(timeout);
    let mut output = Vec::new();
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        client.stream(
            std::io::Cursor::new(b"1\n2\n".to_vec()),
            &mut output,
            StreamOptions::default(),
            |_, _| {},
        ),
    )
    .await
    .expect("stream() gives up by itself");
    assert!(
        matches!(result, Err(SquareError::NoAnswer { .. })),
        "{result:?}"
    );
    holder.abort();
}

#[tokio::test]
async fn waiting_for_input_is_no_reply_timeout() {
    let addr = server(square_server::Settings::default()).await;
    let client = Client::connect(&addr)
        .await
        .unwrap()
        .with_reply_timeout(Duration::from_millis(200));
    let (input, mut typing) = tokio::io::duplex(64);
    let typist = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        typing.write_all(b"5\n").await.unwrap();
        // Five reply timeouts with every request answered.
        tokio::time::sleep(Duration::from_secs(1)).await;
        typing.write_all(b"6\n").await.unwrap();
    });
    let mut output = Vec::new();
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        client.stream(input, &mut output, StreamOptions::default(), |r, out| {
            out.extend_from_slice(r.answer.unwrap().as_bytes());
            out.push(b' ');
        }),
    )
    .await
    .expect("the stream ends with its input");
    assert_eq!(result.unwrap().squared, 2);
    assert_eq!(output, b"25 36 ");
    typist.await.unwrap();
}

#[tokio::test]
async fn an_endless_answer_is_not_kept() {
    use tokio::io::AsyncWriteExt;
    // Something that answers any connection with 8 MiB and no newline, then
    // holds it open.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let talker = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let chunk = vec![b'7'; 64 * 1024];
            tokio::spawn(async move {
                for _ in 0..128 {
                    if stream.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                std::future::pending::<()>().await;
            });
            held.push(());
        }
    });
    let is_too_long = |e: &SquareError| {
        matches!(e, SquareError::Connection(_)) && e.to_string().contains("more than 4 MiB")
    };
    let mut client = Client::connect(&addr).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(20), client.square("12"))
        .await
        .expect("square() stops reading a line that never ends");
    assert!(result.as_ref().is_err_and(is_too_long), "{result:?}");

    let client = Client::connect(&addr).await.unwrap();
    let mut output = Vec::new();
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        client.stream(
            std::io::Cursor::new(b"12\n".to_vec()),
            &mut output,
            StreamOptions::default(),
            |_, _| {},
        ),
    )
    .await
    .expect("stream() stops reading a line that never ends");
    assert!(result.as_ref().is_err_and(is_too_long), "{result:?}");
    talker.abort();
}
