//! What the fuzz targets check, one function per parser that reads outside
//! input. Each takes the fuzzer's raw bytes, runs the parser the way the
//! program does, and asserts what must hold for every input: no panic, and
//! the properties named in each function's documentation. A broken
//! property panics, which the fuzzer reports as a crash.
//!
//! The same functions replay the committed corpora in the normal test run
//! (`tests/tests/fuzz_corpus.rs` includes this file), so a fixed crash stays
//! fixed without the nightly toolchain.

#![forbid(unsafe_code)]

use std::net::Ipv4Addr;
use std::path::Path;

use common::cli::CommonArgs;
use common::config::{resolve_yaml, ConfigErrors, Origin, Sources};
use common::settings::AddressPattern;
use common::tls::hello::{self, HelloParser, Peek, MAX_HELLO};
use echo_server::telnet::{Input, LineReader, IAC, SUBNEGOTIATION_LIMIT};
use serde::de::DeserializeOwned;
use serde::Serialize;
use square_server::number::{self, Rejection};
use tunnel::admin::{self, Head};

/// The square service's number parser and answer.
///
/// Input: byte 0 is `max_digits`, byte 1 times 4 is `max_line`, the rest is
/// one request line. Checks that every answer is one line; that `parse`
/// accepts exactly the documented grammar (`[+|-] DIGITS [. [DIGITS]]` or
/// `[+|-] . DIGITS` inside ASCII whitespace) within the digit limit; that an
/// accepted number's square equals a schoolbook square computed here; that
/// a refusal starts with `ERR ` and is printable ASCII; and that the
/// protocol's line answer refuses over-long lines and otherwise agrees
/// with the number answer.
pub fn square(data: &[u8]) {
    let Some((&[digits, line_quarter], line)) = data.split_first_chunk::<2>() else {
        return;
    };
    let max_digits = usize::from(digits);
    let max_line = 4 * usize::from(line_quarter);

    let mut answer = Vec::new();
    number::answer(line, max_digits, &mut answer);
    let (last, text) = answer.split_last().expect("an answer is never empty");
    assert_eq!(*last, b'\n', "an answer ends its line");
    assert!(!text.contains(&b'\n'), "an answer is one line: {answer:?}");

    let refusal = || {
        assert!(text.starts_with(b"ERR "), "{answer:?}");
        assert!(
            text.iter().all(|b| (0x20..0x7f).contains(b)),
            "a refusal is printable ASCII: {answer:?}"
        );
    };
    let trimmed = line.trim_ascii();
    match (number::parse(line, max_digits), grammar(trimmed)) {
        (Ok(parsed), Some((int, frac))) => {
            assert!(int.len() + frac.len() <= max_digits);
            assert!(!parsed.int.starts_with(b"0") && !parsed.frac.ends_with(b"0"));
            assert_eq!(
                std::str::from_utf8(text).unwrap(),
                reference_square(int, frac),
                "the square of {:?}",
                String::from_utf8_lossy(line)
            );
        }
        (Err(Rejection::Empty), None) => {
            assert!(trimmed.is_empty());
            refusal();
        }
        (Err(Rejection::NotANumber), None) => {
            assert!(!trimmed.is_empty());
            refusal();
        }
        (Err(Rejection::TooManyDigits { digits, max }), Some((int, frac))) => {
            assert_eq!(digits, int.len() + frac.len());
            assert_eq!(max, max_digits);
            assert!(digits > max);
            refusal();
        }
        (got, expected) => panic!(
            "parse({:?}) gave {got:?}; the grammar says {expected:?}",
            String::from_utf8_lossy(line)
        ),
    }

    // A line over `max_line` is refused with this description of it.
    let mut too_long = Vec::new();
    number::explain_too_long(line.trim_ascii_start(), max_line, &mut too_long);
    assert!(too_long.starts_with(b"line too long"), "{too_long:?}");
    assert!(
        too_long.iter().all(|b| (0x20..0x7f).contains(b)),
        "a refusal is printable ASCII, one line: {too_long:?}"
    );
}

/// The integer and fraction digits of a number in the accepted form, or
/// `None` when `text` (already trimmed) is not one. Written apart from the
/// parser under test, straight from its documented grammar.
fn grammar(text: &[u8]) -> Option<(&[u8], &[u8])> {
    let body = text
        .strip_prefix(b"+")
        .or_else(|| text.strip_prefix(b"-"))
        .unwrap_or(text);
    let (int, frac) = match body.iter().position(|&b| b == b'.') {
        Some(dot) => (&body[..dot], &body[dot + 1..]),
        None => (body, &[][..]),
    };
    let all_digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    (all_digits(int) && all_digits(frac) && int.len() + frac.len() > 0).then_some((int, frac))
}

/// The square of `int.frac` in the shortest exact form, by schoolbook
/// multiplication of decimal digits.
fn reference_square(int: &[u8], frac: &[u8]) -> String {
    let digits: Vec<u32> = int
        .iter()
        .chain(frac)
        .map(|&d| u32::from(d - b'0'))
        .collect();
    let mut product = vec![0u32; 2 * digits.len() + 1];
    for (i, a) in digits.iter().rev().enumerate() {
        for (j, b) in digits.iter().rev().enumerate() {
            product[i + j] += a * b;
        }
        // Carry after every row so no cell can overflow.
        for k in 0..product.len() - 1 {
            product[k + 1] += product[k] / 10;
            product[k] %= 10;
        }
    }
    let all: String = product
        .iter()
        .rev()
        .map(|&d| char::from_digit(d, 10).expect("carried to one digit"))
        .collect();
    let (whole, fraction) = all.split_at(all.len() - 2 * frac.len());
    let whole = whole.trim_start_matches('0');
    let fraction = fraction.trim_end_matches('0');
    match (whole.is_empty(), fraction.is_empty()) {
        (true, true) => "0".to_string(),
        (false, true) => whole.to_string(),
        (true, false) => format!("0.{fraction}"),
        (false, false) => format!("{whole}.{fraction}"),
    }
}

/// The telnet decoder of the date/time service.
///
/// Input: byte 0 is the line limit, byte 1 seeds how the rest is split
/// into reads. The rest is fed whole, one byte per read, and in reads of
/// pseudo-random sizes (empty ones included); each way gives the same lines
/// and the same replies. Also checks that no line is longer than the limit
/// or holds a line end, NUL, backspace or DEL; that [`Input::TooLong`] comes
/// at most once and last; and that replies are only refusals (`IAC DONT x`,
/// `IAC WONT x`) and `[yes]` answers, bounded by the input's size.
pub fn telnet(data: &[u8]) {
    let Some((&[limit, seed], bytes)) = data.split_first_chunk::<2>() else {
        return;
    };
    let max_line = usize::from(limit);
    let whole = read_telnet(max_line, [bytes]);
    let bytewise = read_telnet(max_line, bytes.chunks(1));
    assert_eq!(whole, bytewise, "one read against one byte per read");
    let random = read_telnet(max_line, Splits::new(bytes, seed));
    assert_eq!(whole, random, "one read against reads split by seed {seed}");

    // Whatever came before, a user typing `9` is heard (or the session
    // ends with a reason): no input makes a session deaf.
    let mut then_quit = bytes.to_vec();
    then_quit.extend(b"9\r\n".repeat(1 + (SUBNEGOTIATION_LIMIT + max_line) / 3));
    let (heard, _) = read_telnet(max_line, [&then_quit[..]]);
    assert!(
        heard.contains(&Input::Line(b"9".to_vec())) || ends_session(heard.last()),
        "deaf after {bytes:?}: {heard:?}"
    );

    let (inputs, replies) = whole;
    for (i, input) in inputs.iter().enumerate() {
        match input {
            Input::Line(line) => {
                assert!(line.len() <= max_line, "a line over the limit");
                assert!(
                    !line
                        .iter()
                        .any(|b| [b'\r', b'\n', 0, 0x08, 0x7f].contains(b)),
                    "control bytes in a line: {line:?}"
                );
            }
            Input::TooLong | Input::SubnegotiationTooLong => {
                assert_eq!(
                    i,
                    inputs.len() - 1,
                    "an input that ends the session comes last"
                )
            }
        }
    }
    let text: usize = inputs
        .iter()
        .map(|input| match input {
            Input::Line(line) => line.len() + 1,
            Input::TooLong | Input::SubnegotiationTooLong => 0,
        })
        .sum();
    assert!(text <= bytes.len(), "more line bytes than input bytes");
    assert!(
        replies.len() <= 5 * bytes.len(),
        "replies out of proportion"
    );
    let mut rest = &replies[..];
    while !rest.is_empty() {
        rest = match rest {
            [IAC, 252 | 254, _, tail @ ..] => tail,
            _ => rest
                .strip_prefix(b"\r\n[yes]\r\n")
                .unwrap_or_else(|| panic!("an unexpected reply: {replies:?}")),
        };
    }
}

/// Whether an input ends the session (the service closes the connection).
fn ends_session(input: Option<&Input>) -> bool {
    matches!(input, Some(Input::TooLong | Input::SubnegotiationTooLong))
}

/// Feeds `chunks` to a fresh reader as successive reads, stopping after an
/// input that ends the session, as the service does.
fn read_telnet<'a>(
    max_line: usize,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> (Vec<Input>, Vec<u8>) {
    let mut reader = LineReader::new(max_line);
    let (mut inputs, mut replies) = (Vec::new(), Vec::new());
    for chunk in chunks {
        reader.feed(chunk, &mut inputs, &mut replies);
        if ends_session(inputs.last()) {
            break;
        }
    }
    (inputs, replies)
}

/// `bytes` cut into pieces of 0 to 8 bytes, sizes drawn by xorshift from a
/// seed.
struct Splits<'a> {
    rest: &'a [u8],
    state: u32,
}

impl<'a> Splits<'a> {
    fn new(bytes: &'a [u8], seed: u8) -> Self {
        Splits {
            rest: bytes,
            state: (u32::from(seed) + 1).wrapping_mul(0x9e37_79b9),
        }
    }
}

impl<'a> Iterator for Splits<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        self.state ^= self.state << 13;
        self.state ^= self.state >> 17;
        self.state ^= self.state << 5;
        let size = (self.state % 9) as usize;
        let (piece, rest) = self.rest.split_at(size.min(self.rest.len()));
        self.rest = rest;
        Some(piece)
    }
}

/// The tunnel's rinetd.conf parser.
///
/// Input: the file's bytes (invalid UTF-8 replaced, as a text file would
/// be read lossily). Checks that a file that parses has rules and that its
/// routes resolve (a file accepted by the parser must not fail later
/// without a line number); that every `allow`/`deny` entry reads back as
/// itself from the text `--print-config` shows; that a wildcard pattern
/// matches a client address exactly when the plain recursive reading of
/// `*` and `?` over the dotted-decimal text does (client addresses taken
/// from the input's bytes); and that every problem has a message and a
/// line number inside the file (0 for the whole file).
pub fn rinetd(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let lines = text.lines().count();
    match tunnel::rinetd::parse(&text) {
        Ok(settings) => {
            assert!(!settings.routes.is_empty(), "accepted without rules");
            let routes = settings
                .routes()
                .unwrap_or_else(|e| panic!("accepted, then refused by routes(): {e:?}"));
            assert_eq!(routes.len(), settings.routes.len());
            for route in &routes {
                assert_eq!(route.listen.len(), 1);
                assert_eq!(route.targets.len(), 1);
            }
            let mut octets = data.iter().rev().copied().cycle();
            let lists = [&settings.allow, &settings.deny]
                .into_iter()
                .chain(settings.routes.iter().flat_map(|r| [&r.allow, &r.deny]));
            for entry in lists.flat_map(|list| &list.0) {
                let shown = entry.to_string();
                assert_eq!(
                    shown.parse::<AddressPattern>().as_ref(),
                    Ok(entry),
                    "{shown:?} reads back as something else"
                );
                if let AddressPattern::Wildcard(pattern) = entry {
                    for _ in 0..8 {
                        let ip = Ipv4Addr::from(std::array::from_fn::<u8, 4, _>(|_| {
                            octets.next().unwrap_or(1)
                        }));
                        assert_eq!(
                            pattern.matches_ipv4(ip),
                            glob(pattern.as_str().as_bytes(), ip.to_string().as_bytes()),
                            "{pattern} against {ip}"
                        );
                    }
                }
            }
        }
        Err(problems) => {
            assert!(!problems.is_empty(), "refused without a reason");
            for (line, message) in problems {
                assert!(line <= lines, "line {line} of a {lines}-line file");
                assert!(!message.is_empty());
            }
        }
    }
}

/// Whether `pattern` (`*` any run, `?` any one byte) matches all of
/// `text`, by the textbook table: `matched[j]` says whether the pattern
/// read so far matches the first `j` bytes of the text.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let mut matched = vec![false; text.len() + 1];
    matched[0] = true;
    for &p in pattern {
        let mut next = vec![false; text.len() + 1];
        for j in 0..=text.len() {
            next[j] = match p {
                b'*' => matched[j] || (j > 0 && next[j - 1]),
                b'?' => j > 0 && matched[j - 1],
                _ => j > 0 && matched[j - 1] && text[j - 1] == p,
            };
        }
        matched = next;
    }
    matched[text.len()]
}

/// The YAML configuration loader, as `--config FILE` uses it, for the
/// tunnel (with its routes), the date/time service (with its clock) and
/// the square service.
///
/// Input: the file's bytes (invalid UTF-8 replaced). Checks that resolution
/// never panics, that a resolved configuration can be printed
/// (`--print-config`), and that every error has a message and, when it
/// points into the file, a line inside it.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    resolve_as::<tunnel::Settings>(tunnel::settings::PROGRAM, &text, |settings| {
        if let Err(errors) = settings.routes() {
            assert!(!errors.is_empty());
            for e in errors {
                assert!(!e.message.is_empty());
            }
        }
    });
    resolve_as::<echo_server::Settings>(echo_server::PROGRAM, &text, |settings| {
        let _ = echo_server::Clock::from_settings(settings);
    });
    resolve_as::<square_server::Settings>(square_server::PROGRAM, &text, |settings| {
        let _ = settings.limits();
    });
}

fn resolve_as<T>(program: &'static str, text: &str, then: impl FnOnce(&T))
where
    T: Serialize + DeserializeOwned + Default + common::config::ProgramSettings,
{
    let path = Path::new("config.yaml");
    let sources = Sources {
        converted: None,
        program,
        file: Some(path.to_path_buf()),
        flags: CommonArgs::default(),
        env_ignore: &["config"],
    };
    match resolve_yaml::<T, _>(&sources, path, text) {
        Ok(resolved) => {
            let _ = resolved.print_config();
            then(&resolved.settings);
        }
        Err(errors) => check_config_errors(&errors, text),
    }
}

fn check_config_errors(errors: &ConfigErrors, text: &str) {
    assert!(!errors.0.is_empty(), "refused without a reason");
    let lines = yaml_lines(text);
    for e in &errors.0 {
        assert!(!e.message.is_empty());
        if let Some(Origin::File {
            line: Some(line), ..
        }) = e.origin
        {
            assert!(
                (1..=lines).contains(&line),
                "line {line} of a {lines}-line file"
            );
        }
    }
    assert!(!errors.to_string().is_empty());
}

/// The number of lines of a YAML text as the YAML parser counts them: CR
/// LF, LF, a lone CR, and the Unicode breaks NEL, LS and PS each end a line,
/// and a position just past the last line break (where an error about a
/// truncated document points) is a line too.
fn yaml_lines(text: &str) -> usize {
    let mut chars = text.chars().peekable();
    let mut breaks = 0;
    while let Some(c) = chars.next() {
        match c {
            '\r' if chars.peek() == Some(&'\n') => {}
            '\r' | '\n' | '\u{85}' | '\u{2028}' | '\u{2029}' => breaks += 1,
            _ => {}
        }
    }
    breaks + 1
}

/// The service definition loader (`deploy check`, `run` and `render` start
/// with it).
///
/// Input: the definition's bytes (invalid UTF-8 replaced). Checks that a
/// definition that loads has what its users rely on (known programs, at
/// least one instance per role) and renders in every environment, and that
/// every problem has a message and, when it has a place, one inside the
/// file.
pub fn definition(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let path = Path::new("service.yaml");
    match deploy::definition::Definition::parse(&text, path) {
        Ok(definition) => {
            assert!(!definition.roles.is_empty(), "accepted without roles");
            for role in &definition.roles {
                let program = role.program();
                assert!(role.count() >= 1);
                assert!(role.endpoints.len() <= 1);
                for endpoint in &role.endpoints {
                    assert_eq!(endpoint.name, program.endpoint);
                    assert_ne!(endpoint.port, 0);
                }
                let _ = role.instance_id(role.count() - 1);
            }
            // What each environment would run is checked and rendered
            // without a panic, whatever the layers say.
            for problem in definition.all_findings() {
                assert!(!problem.message.is_empty());
            }
            for environment in deploy::definition::Environment::ALL {
                let _ = definition.findings(environment);
                let applied = definition.in_environment(environment);
                let _ = deploy::render::kubernetes(&applied);
                let _ = deploy::render::compose(&applied, Some(".."));
            }
        }
        Err(problems) => {
            assert!(!problems.0.is_empty(), "refused without a reason");
            // An error at the end of the document (a missing key) may point
            // at the line after the last, even without a final line break.
            let lines = yaml_lines(&text) + 1;
            for problem in &problems.0 {
                assert!(!problem.message.is_empty());
                if let Some(pos) = problem.pos {
                    assert!(
                        (1..=lines).contains(&pos.line) && pos.column >= 1,
                        "{pos} in a {lines}-line file"
                    );
                }
            }
            assert!(!problems.to_string().is_empty());
        }
    }
}

/// The tunnel admin endpoint's request reader.
///
/// Input: the bytes a client sends. Checks that a head over the size bound
/// is refused; that a complete head is decided by its first line only, so
/// the answer does not depend on how the bytes arrive (the shortest
/// complete prefix gives the same request as the whole input, and one byte
/// less is still incomplete); and that a head without an empty line is
/// incomplete.
pub fn admin(data: &[u8]) {
    let head = admin::parse_head(data);
    if data.len() > admin::MAX_HEAD {
        assert_eq!(head, Head::TooLarge);
        return;
    }
    let end = (0..data.len()).find_map(|i| {
        let rest = &data[i..];
        if rest.starts_with(b"\n\n") {
            Some(i + 2)
        } else if rest.starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else {
            None
        }
    });
    match end {
        None => assert_eq!(head, Head::Incomplete),
        Some(end) => {
            assert!(matches!(head, Head::Complete(_)), "{head:?}");
            assert_eq!(admin::parse_head(&data[..end]), head);
            assert_eq!(admin::parse_head(&data[..end - 1]), Head::Incomplete);
        }
    }
}

/// The ClientHello peek that SNI routing reads a connection's first bytes
/// with (rustls's own hello parser behind a byte and memory bound).
///
/// Input: bytes 0 and 1 (little-endian) choose where the rest is split;
/// the rest is the connection's first bytes. Checks that the rest fed at
/// once and fed in two reads split there give the same answer (an answer
/// given after the first read is the whole input's answer too; refusals
/// may word their reason differently, having seen fewer bytes); that the
/// parser asks for more only below [`MAX_HELLO`] bytes and refuses as too
/// large only at or above it; that a server name is non-empty, lowercase
/// ASCII without a trailing dot; and that a refusal has a reason.
pub fn client_hello(data: &[u8]) {
    let Some((&split, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let split = usize::from(u16::from_le_bytes(split)) % (rest.len() + 1);
    let whole = hello::peek(rest);
    match &whole {
        Peek::NeedMore => assert!(rest.len() < MAX_HELLO, "more than {MAX_HELLO} bytes"),
        Peek::TooLarge => assert!(rest.len() >= MAX_HELLO, "too large at {}", rest.len()),
        Peek::NotTls(reason) => assert!(!reason.is_empty(), "a refusal without a reason"),
        Peek::Hello {
            server_name: Some(name),
        } => {
            assert!(!name.is_empty(), "an empty server name");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase()),
                "server name {name:?}"
            );
            assert!(!name.ends_with('.'), "server name {name:?}");
        }
        Peek::Hello { server_name: None } => {}
    }

    let (first, second) = rest.split_at(split);
    let mut parser = HelloParser::new();
    let early = parser.feed(first);
    let split_answer = if early.is_final() {
        early
    } else {
        parser.feed(second)
    };
    assert_eq!(
        without_reason(split_answer),
        without_reason(whole),
        "the rest whole against split at {split}"
    );
}

/// `peek` with the reason of a refusal left out.
fn without_reason(peek: Peek) -> Peek {
    match peek {
        Peek::NotTls(_) => Peek::NotTls(String::new()),
        other => other,
    }
}

/// Checks the PROXY protocol reader ([`common::proxy::parse`]) on the first
/// bytes of a connection: that a header it finds lies within the input
/// and the size bounds, and is found again, with the same length and
/// addresses, in exactly its own bytes; that every shorter prefix of it
/// asks for more; that a client address it carries, written again as a
/// header of either version, reads back the same; that it asks for more
/// only below the version 2 bound; that a refusal has a reason and stays
/// a refusal whatever follows.
pub fn proxy_header(data: &[u8]) {
    use common::proxy::{self, Carried, Parsed, Version, MAX_V1, MAX_V2};
    match proxy::parse(data) {
        Parsed::NeedMore => assert!(data.len() < MAX_V2, "more than {MAX_V2} bytes"),
        Parsed::Invalid(reason) => {
            assert!(!reason.is_empty(), "a refusal without a reason");
            let mut longer = data.to_vec();
            longer.extend_from_slice(b"\r\n");
            assert!(
                matches!(proxy::parse(&longer), Parsed::Invalid(_)),
                "refused, then taken with more bytes"
            );
        }
        Parsed::Header { len, carried } => {
            assert!(
                len <= data.len(),
                "a header of {len} bytes in {}",
                data.len()
            );
            let bound = if data[0] == b'P' { MAX_V1 } else { MAX_V2 };
            assert!(len <= bound, "a header of {len} bytes, over {bound}");
            assert_eq!(
                proxy::parse(&data[..len]),
                Parsed::Header { len, carried },
                "its own bytes read otherwise"
            );
            assert_eq!(
                proxy::parse(&data[..len - 1]),
                Parsed::NeedMore,
                "a header one byte short"
            );
            if let Carried::Tcp {
                source,
                destination,
            } = carried
            {
                for version in [Version::V1, Version::V2] {
                    let again = proxy::header(version, source, destination);
                    assert_eq!(
                        proxy::parse(&again),
                        Parsed::Header {
                            len: again.len(),
                            carried
                        },
                        "{version} of {source} {destination}"
                    );
                }
            }
        }
    }
}
