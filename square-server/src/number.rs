//! Exact squares of numbers written as decimal text, and the error an input
//! gets when it is not one.
//!
//! A number is `[+|-] DIGITS [. [DIGITS]]` or `[+|-] . DIGITS`, with
//! surrounding ASCII whitespace ignored: `12`, `-7`, `+3`, `1.5`, `.5`, `5.`.
//! No exponents, no digit separators. The square is printed in the shortest
//! exact form: no sign (it is never negative), no leading zeros in the
//! integer part, no trailing zeros in the fraction, and no point when it is
//! whole (`2.50` squares to `6.25`, `-1.0` to `1`, `.5` to `0.25`).
//!
//! Nothing here uses floating point. Numbers of up to 19 significant digits
//! (integer and fraction digits together) are squared in `u128`, which
//! cannot overflow since `(10^19)^2 < 2^128`; larger ones go through
//! `num-bigint`.

use num_bigint::BigUint;

/// Where answers are written: a `Vec<u8>`, or a connection's output
/// buffer.
pub trait Output {
    /// Appends `bytes`.
    fn extend_from_slice(&mut self, bytes: &[u8]);

    /// Appends `count` copies of `byte`.
    fn push_repeated(&mut self, byte: u8, count: usize);

    /// Appends one byte.
    fn push(&mut self, byte: u8) {
        self.extend_from_slice(&[byte]);
    }
}

impl Output for Vec<u8> {
    fn extend_from_slice(&mut self, bytes: &[u8]) {
        Vec::extend_from_slice(self, bytes);
    }

    fn push_repeated(&mut self, byte: u8, count: usize) {
        self.resize(self.len() + count, byte);
    }

    fn push(&mut self, byte: u8) {
        Vec::push(self, byte);
    }
}

/// Significant digits that always fit the `u64`/`u128` fast path.
const FAST_DIGITS: usize = 19;

/// How many bytes of an offending input an error message quotes.
pub const QUOTE_BYTES: usize = 40;

/// Why an input has no square.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The line holds nothing but whitespace.
    Empty,
    /// The line is not a number in the accepted form.
    NotANumber,
    /// The number has more digits than allowed.
    TooManyDigits {
        /// Digits written (before and after the point).
        digits: usize,
        /// The configured limit.
        max: usize,
    },
}

/// A number taken apart: its digits without the sign, leading zeros of the
/// integer part, or trailing zeros of the fraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed<'a> {
    /// Integer digits, without leading zeros (empty for a zero integer part).
    pub int: &'a [u8],
    /// Fraction digits, without trailing zeros.
    pub frac: &'a [u8],
}

impl Parsed<'_> {
    /// Digits that count for the cost of squaring: the integer and fraction
    /// digits without leading or trailing zeros.
    pub fn significant_digits(&self) -> usize {
        self.int.len() + self.frac.len()
    }
}

/// Parses one request, allowing at most `max_digits` digits as written
/// (integer and fraction digits together, zeros included, so the cost of a
/// request is bounded by what the client sends).
pub fn parse(text: &[u8], max_digits: usize) -> Result<Parsed<'_>, Rejection> {
    let text = text.trim_ascii();
    if text.is_empty() {
        return Err(Rejection::Empty);
    }
    let body = match text[0] {
        b'+' | b'-' => &text[1..],
        _ => text,
    };
    let (int, frac) = match memchr::memchr(b'.', body) {
        Some(dot) => (&body[..dot], &body[dot + 1..]),
        None => (body, &body[body.len()..]),
    };
    if (int.is_empty() && frac.is_empty())
        || !int.iter().all(u8::is_ascii_digit)
        || !frac.iter().all(u8::is_ascii_digit)
    {
        return Err(Rejection::NotANumber);
    }
    let digits = int.len() + frac.len();
    if digits > max_digits {
        return Err(Rejection::TooManyDigits {
            digits,
            max: max_digits,
        });
    }
    let leading = int.iter().take_while(|&&d| d == b'0').count();
    let trailing = frac.iter().rev().take_while(|&&d| d == b'0').count();
    Ok(Parsed {
        int: &int[leading..],
        frac: &frac[..frac.len() - trailing],
    })
}

/// Appends the exact square of `n` in its shortest form.
pub fn write_square(n: Parsed<'_>, out: &mut impl Output) {
    // Squaring doubles the number of fraction digits; since the last
    // fraction digit is not zero, neither is the square's last digit, so
    // there are never trailing zeros to strip afterwards.
    let scale = 2 * n.frac.len();
    if n.significant_digits() <= FAST_DIGITS {
        let value = n
            .int
            .iter()
            .chain(n.frac)
            .fold(0u64, |acc, &d| acc * 10 + u64::from(d - b'0'));
        let value = u128::from(value);
        let mut buf = itoa::Buffer::new();
        place_point(buf.format(value * value).as_bytes(), scale, out);
    } else {
        write_big_square(n, out);
    }
}

/// The `num-bigint` path; public to the crate so tests can check it on
/// small numbers against the fast path.
pub(crate) fn write_big_square(n: Parsed<'_>, out: &mut impl Output) {
    let scale = 2 * n.frac.len();
    let mut digits = Vec::with_capacity(n.int.len() + n.frac.len());
    digits.extend_from_slice(n.int);
    digits.extend_from_slice(n.frac);
    let value = if digits.is_empty() {
        BigUint::default()
    } else {
        BigUint::parse_bytes(&digits, 10).expect("parse() lets only ASCII digits through")
    };
    let square = &value * &value;
    place_point(square.to_str_radix(10).as_bytes(), scale, out);
}

/// Writes `digits` (a whole number without leading zeros) divided by
/// `10^scale`.
fn place_point(digits: &[u8], scale: usize, out: &mut impl Output) {
    if scale == 0 {
        out.extend_from_slice(digits);
    } else if digits.len() > scale {
        let (int, frac) = digits.split_at(digits.len() - scale);
        out.extend_from_slice(int);
        out.push(b'.');
        out.extend_from_slice(frac);
    } else {
        out.extend_from_slice(b"0.");
        out.push_repeated(b'0', scale - digits.len());
        out.extend_from_slice(digits);
    }
}

/// Appends the answer to one request line: its square or `ERR <reason>`,
/// then a newline.
pub fn answer(line: &[u8], max_digits: usize, out: &mut impl Output) {
    match parse(line, max_digits) {
        Ok(n) => write_square(n, out),
        Err(rejection) => {
            out.extend_from_slice(b"ERR ");
            explain(rejection, line.trim_ascii(), out);
        }
    }
    out.push(b'\n');
}

/// Appends the reason for `rejection` of `input`, naming the input.
pub fn explain(rejection: Rejection, input: &[u8], out: &mut impl Output) {
    match rejection {
        Rejection::Empty => {
            out.extend_from_slice(b"empty line; send one number per line, such as 12")
        }
        Rejection::NotANumber => {
            quote(input, out);
            out.extend_from_slice(
                b" is not a number; send an integer or a decimal such as -12 or 1.5",
            );
        }
        Rejection::TooManyDigits { digits, max } => {
            quote(input, out);
            let mut buf = itoa::Buffer::new();
            out.extend_from_slice(b" has too many digits: ");
            out.extend_from_slice(buf.format(digits).as_bytes());
            out.extend_from_slice(b", at most ");
            out.extend_from_slice(buf.format(max).as_bytes());
            out.extend_from_slice(b" are allowed");
        }
    }
}

/// Appends the reason a line over `max_line` bytes was refused.
pub fn explain_too_long(input: &[u8], max_line: usize, out: &mut impl Output) {
    let mut buf = itoa::Buffer::new();
    out.extend_from_slice(b"line too long: ");
    quote(input, out);
    out.extend_from_slice(b" is over ");
    out.extend_from_slice(buf.format(max_line).as_bytes());
    out.extend_from_slice(b" bytes");
}

/// Appends `input` in double quotes, shortened to [`QUOTE_BYTES`] bytes with
/// `...`, with quotes, backslashes and anything but printable ASCII escaped
/// so that an answer always stays on one line.
pub fn quote(input: &[u8], out: &mut impl Output) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for &b in input.iter().take(QUOTE_BYTES) {
        match b {
            b'"' | b'\\' => out.extend_from_slice(&[b'\\', b]),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\r' => out.extend_from_slice(b"\\r"),
            0x20..=0x7e => out.push(b),
            _ => out.extend_from_slice(&[
                b'\\',
                b'x',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 15)],
            ]),
        }
    }
    if input.len() > QUOTE_BYTES {
        out.extend_from_slice(b"...");
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn square(text: &str) -> String {
        let mut out = Vec::new();
        answer(text.as_bytes(), 10_000, &mut out);
        String::from_utf8(out)
            .unwrap()
            .trim_end_matches('\n')
            .to_string()
    }

    #[test]
    fn integers_and_decimals() {
        for (input, expected) in [
            ("12", "144"),
            ("-12", "144"),
            ("+3", "9"),
            ("0", "0"),
            ("-0", "0"),
            ("007", "49"),
            ("1.5", "2.25"),
            ("-0.1", "0.01"),
            ("2.50", "6.25"),
            ("2.00", "4"),
            (".5", "0.25"),
            ("-.5", "0.25"),
            ("5.", "25"),
            ("0.000", "0"),
            ("0.001", "0.000001"),
            ("  42 \t", "1764"),
            ("42\r", "1764"),
            (
                "9999999999999999999",
                "99999999999999999980000000000000000001",
            ),
            (
                "10000000000000000000",
                "100000000000000000000000000000000000000",
            ),
            (
                "-99999999999999999999",
                "9999999999999999999800000000000000000001",
            ),
            (
                "123456789.123456789",
                "15241578780673678.515622620750190521",
            ),
        ] {
            assert_eq!(square(input), expected, "square of {input:?}");
        }
    }

    #[test]
    fn rejections_name_the_input_and_the_rule() {
        assert_eq!(
            square("12x"),
            r#"ERR "12x" is not a number; send an integer or a decimal such as -12 or 1.5"#
        );
        assert_eq!(
            square("   "),
            "ERR empty line; send one number per line, such as 12"
        );
        for bad in [
            "-", "+", ".", "-.", "1.2.3", "1e5", "1_000", "1 2", "0x10", "--1", "١٢",
        ] {
            assert!(
                square(bad).starts_with("ERR \""),
                "{bad:?}: {}",
                square(bad)
            );
        }
        let mut out = Vec::new();
        answer(b"123456", 5, &mut out);
        assert_eq!(
            out,
            b"ERR \"123456\" has too many digits: 6, at most 5 are allowed\n"
        );
    }

    #[test]
    fn quotes_are_short_escaped_and_on_one_line() {
        let mut out = Vec::new();
        quote(b"a\"b\\c\n\xff\x01", &mut out);
        assert_eq!(out, br#""a\"b\\c\x0a\xff\x01""#);
        out.clear();
        quote(&[b'7'; 100], &mut out);
        assert_eq!(out.len(), QUOTE_BYTES + 5);
        assert!(out.ends_with(b"...\""));
    }

    /// Schoolbook multiplication of decimal digit strings: slow, obviously
    /// right, and independent of the code under test.
    fn reference_square(text: &str) -> String {
        let text = text.trim();
        let body = text.trim_start_matches(['+', '-']);
        let (int, frac) = body.split_once('.').unwrap_or((body, ""));
        let digits: Vec<u32> = int
            .chars()
            .chain(frac.chars())
            .map(|c| c.to_digit(10).unwrap())
            .collect();
        let mut product = vec![0u32; 2 * digits.len() + 1];
        for (i, a) in digits.iter().rev().enumerate() {
            for (j, b) in digits.iter().rev().enumerate() {
                product[i + j] += a * b;
            }
            // Carry as we go so no cell overflows.
            for k in 0..product.len() - 1 {
                product[k + 1] += product[k] / 10;
                product[k] %= 10;
            }
        }
        let scale = 2 * frac.len();
        let mut s: String = product
            .iter()
            .rev()
            .map(|d| char::from_digit(*d, 10).unwrap())
            .collect();
        // Now s is the whole square with `scale` fraction digits.
        let (int, frac) = s.split_at(s.len() - scale);
        let int = int.trim_start_matches('0');
        let frac = frac.trim_end_matches('0');
        s = match (int.is_empty(), frac.is_empty()) {
            (true, true) => "0".to_string(),
            (false, true) => int.to_string(),
            (true, false) => format!("0.{frac}"),
            (false, false) => format!("{int}.{frac}"),
        };
        s
    }

    fn number(max_int: usize, max_frac: usize) -> impl Strategy<Value = String> {
        (
            prop::sample::select(vec!["", "-", "+"]),
            prop::string::string_regex(&format!("[0-9]{{0,{max_int}}}")).unwrap(),
            prop::option::of(
                prop::string::string_regex(&format!("[0-9]{{0,{max_frac}}}")).unwrap(),
            ),
        )
            .prop_filter("needs a digit", |(_, int, frac)| {
                !int.is_empty() || frac.as_ref().is_some_and(|f| !f.is_empty())
            })
            .prop_map(|(sign, int, frac)| match frac {
                Some(frac) => format!("{sign}{int}.{frac}"),
                None => format!("{sign}{int}"),
            })
    }

    proptest! {
        #[test]
        fn small_numbers_match_the_reference(n in number(25, 25)) {
            prop_assert_eq!(square(&n), reference_square(&n));
        }

        #[test]
        fn the_big_path_agrees_with_the_fast_path(n in number(12, 7)) {
            let parsed = parse(n.as_bytes(), 100).unwrap();
            let (mut fast, mut big) = (Vec::new(), Vec::new());
            write_square(parsed, &mut fast);
            write_big_square(parsed, &mut big);
            prop_assert_eq!(fast, big);
        }

        #[test]
        fn integers_near_the_fast_path_limit(n in any::<u64>(), neg in any::<bool>()) {
            let text = if neg { format!("-{n}") } else { n.to_string() };
            prop_assert_eq!(square(&text), (u128::from(n) * u128::from(n)).to_string());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn huge_numbers_match_the_reference(n in number(1500, 1000)) {
            prop_assert_eq!(square(&n), reference_square(&n));
        }
    }

    #[test]
    fn the_largest_allowed_number() {
        let nines = "9".repeat(10_000);
        let got = square(&nines);
        // (10^n - 1)^2 = 10^2n - 2*10^n + 1: n-1 nines, an 8, n-1 zeros, a 1.
        let expected = format!("{}8{}1", "9".repeat(9_999), "0".repeat(9_999));
        assert_eq!(got, expected);
        assert!(square(&"9".repeat(10_001)).contains("too many digits: 10001"));
    }
}
