//! Reading lines from a telnet client, or from `nc`.
//!
//! A telnet client may send option negotiation (`IAC DO ECHO`, ...) and
//! subnegotiation (`IAC SB ... IAC SE`) among its keystrokes. These are
//! stripped from the text; every option the client offers or asks for is
//! refused (`WILL x` gets `DONT x`, `DO x` gets `WONT x`), so the client stays
//! in its default line-at-a-time mode with local echo, which suits a menu.
//! Lines end in CR LF, LF, or CR NUL (and a bare CR); backspace, DEL and
//! telnet's erase commands edit the line for clients that send keys raw.
//!
//! Nothing the client sends can make the reader hold more than a line, or
//! stop listening. A line is limited to the reader's limit. A subnegotiation
//! is limited to [`SUBNEGOTIATION_LIMIT`] bytes: since every option is
//! refused, the only ones a client sends are short status reports (window
//! size, terminal type) that it sends before it sees the refusal, so a
//! longer one means the client lost track of the protocol and the session
//! ends. As BSD's telnetd does, `IAC` followed by a command other than `SE`
//! or `IAC` inside a subnegotiation ends it and the command is obeyed.
//!
//! The reader decodes one event at a time ([`LineReader::decode`]), so its
//! caller can stop between two answers when its output backs up.

/// Telnet's "interpret as command" byte.
pub const IAC: u8 = 255;
const DONT: u8 = 254;
const DO: u8 = 253;
const WONT: u8 = 252;
const WILL: u8 = 251;
const SB: u8 = 250;
const EL: u8 = 248;
const EC: u8 = 247;
const AYT: u8 = 246;
const SE: u8 = 240;

/// The most bytes a subnegotiation may carry between `IAC SB` and `IAC SE`
/// (BSD telnetd's buffer is as large). A window size report takes 5 to 9,
/// a terminal type at most about 45.
pub const SUBNEGOTIATION_LIMIT: usize = 512;

/// Something the reader found in the client's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A complete line, without its line end.
    Line(Vec<u8>),
    /// The line grew past the limit before it ended.
    TooLong,
    /// A subnegotiation ran past [`SUBNEGOTIATION_LIMIT`] bytes without its
    /// `IAC SE`.
    SubnegotiationTooLong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Data,
    /// After a CR: a following LF or NUL belongs to the same line end.
    AfterCr,
    Iac,
    Option(u8),
    /// Inside a subnegotiation, with this many bytes of it seen.
    Sub(usize),
    /// An IAC inside a subnegotiation, with this many bytes of it seen.
    SubIac(usize),
}

/// Turns the client's bytes into lines and negotiation replies.
#[derive(Debug)]
pub struct LineReader {
    state: State,
    line: Vec<u8>,
    limit: usize,
}

impl LineReader {
    /// A reader that reports lines longer than `limit` bytes as too long.
    pub fn new(limit: usize) -> Self {
        LineReader {
            state: State::Data,
            line: Vec::new(),
            limit,
        }
    }

    /// Decodes `bytes` up to the first event: a complete input, or a reply
    /// to negotiation (appended to `replies`, at most 9 bytes). Returns how
    /// many bytes it used, and the input if one completed; call again with
    /// the rest. After [`Input::TooLong`] or [`Input::SubnegotiationTooLong`]
    /// the caller closes the session.
    pub fn decode(&mut self, bytes: &[u8], replies: &mut Vec<u8>) -> (usize, Option<Input>) {
        for (i, &b) in bytes.iter().enumerate() {
            let replied = replies.len();
            let input = self.byte(b, replies);
            if input.is_some() || replies.len() != replied {
                return (i + 1, input);
            }
        }
        (bytes.len(), None)
    }

    /// Decodes all of `bytes`: inputs go to `inputs`, replies to `replies`.
    /// It stops at [`Input::TooLong`] or [`Input::SubnegotiationTooLong`],
    /// ignoring the rest.
    pub fn feed(&mut self, mut bytes: &[u8], inputs: &mut Vec<Input>, replies: &mut Vec<u8>) {
        while !bytes.is_empty() {
            let (used, input) = self.decode(bytes, replies);
            bytes = &bytes[used..];
            match input {
                Some(Input::Line(line)) => inputs.push(Input::Line(line)),
                Some(end) => {
                    inputs.push(end);
                    return;
                }
                None => {}
            }
        }
    }

    fn byte(&mut self, b: u8, replies: &mut Vec<u8>) -> Option<Input> {
        match self.state {
            State::AfterCr if b == b'\n' || b == 0 => self.state = State::Data,
            State::Data | State::AfterCr => {
                self.state = State::Data;
                match b {
                    IAC => self.state = State::Iac,
                    b'\r' => {
                        self.state = State::AfterCr;
                        return Some(Input::Line(std::mem::take(&mut self.line)));
                    }
                    b'\n' => return Some(Input::Line(std::mem::take(&mut self.line))),
                    0x08 | 0x7f => {
                        self.line.pop();
                    }
                    0 => {}
                    _ => return self.push(b),
                }
            }
            State::Iac => return self.command(b, replies),
            State::Option(command) => {
                self.state = State::Data;
                match command {
                    WILL => replies.extend_from_slice(&[IAC, DONT, b]),
                    DO => replies.extend_from_slice(&[IAC, WONT, b]),
                    // WONT and DONT agree with what we do already; an
                    // answer could start a negotiation loop.
                    _ => {}
                }
            }
            State::Sub(seen) => {
                if seen >= SUBNEGOTIATION_LIMIT {
                    self.state = State::Data;
                    self.line.clear();
                    return Some(Input::SubnegotiationTooLong);
                }
                self.state = if b == IAC {
                    State::SubIac(seen + 1)
                } else {
                    State::Sub(seen + 1)
                };
            }
            State::SubIac(seen) => match b {
                SE => self.state = State::Data,
                // An escaped 255 in the subnegotiation's data.
                IAC => self.state = State::Sub(seen + 1),
                // A command in the middle: the subnegotiation was cut
                // short; obey the command.
                _ => return self.command(b, replies),
            },
        }
        None
    }

    /// The command byte after an IAC.
    fn command(&mut self, b: u8, replies: &mut Vec<u8>) -> Option<Input> {
        self.state = State::Data;
        match b {
            // IAC IAC is a data byte 255.
            IAC => return self.push(b),
            WILL | WONT | DO | DONT => self.state = State::Option(b),
            SB => self.state = State::Sub(0),
            EC => {
                self.line.pop();
            }
            EL => self.line.clear(),
            AYT => replies.extend_from_slice(b"\r\n[yes]\r\n"),
            // NOP, data mark, break, interrupt, abort output, GA, a stray
            // SE: nothing to do for a menu.
            _ => {}
        }
        None
    }

    fn push(&mut self, b: u8) -> Option<Input> {
        if self.line.len() >= self.limit {
            self.line = Vec::new();
            return Some(Input::TooLong);
        }
        self.line.push(b);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8]) -> (Vec<Input>, Vec<u8>) {
        let mut reader = LineReader::new(16);
        let (mut inputs, mut replies) = (Vec::new(), Vec::new());
        reader.feed(bytes, &mut inputs, &mut replies);
        (inputs, replies)
    }

    fn line(s: &str) -> Input {
        Input::Line(s.as_bytes().to_vec())
    }

    #[test]
    fn every_line_end() {
        let (inputs, _) = read(b"1\r\n2\n1\r\x002\r9\n");
        assert_eq!(
            inputs,
            vec![line("1"), line("2"), line("1"), line("2"), line("9")]
        );
    }

    #[test]
    fn line_ends_split_across_reads() {
        let mut reader = LineReader::new(16);
        let (mut inputs, mut replies) = (Vec::new(), Vec::new());
        reader.feed(b"1\r", &mut inputs, &mut replies);
        reader.feed(b"\n2", &mut inputs, &mut replies);
        reader.feed(b"\r", &mut inputs, &mut replies);
        reader.feed(b"\0", &mut inputs, &mut replies);
        assert_eq!(inputs, vec![line("1"), line("2")]);
    }

    #[test]
    fn negotiation_is_stripped_and_refused() {
        // DO ECHO, WILL NAWS, a NAWS subnegotiation, WONT LINEMODE, then "1".
        let bytes = [
            IAC, DO, 1, IAC, WILL, 31, IAC, SB, 31, 0, 80, 0, 24, IAC, SE, IAC, WONT, 34, b'1',
            b'\r', b'\n',
        ];
        let (inputs, replies) = read(&bytes);
        assert_eq!(inputs, vec![line("1")]);
        assert_eq!(replies, vec![IAC, WONT, 1, IAC, DONT, 31]);
    }

    #[test]
    fn negotiation_split_across_reads() {
        let mut reader = LineReader::new(16);
        let (mut inputs, mut replies) = (Vec::new(), Vec::new());
        for b in [IAC, DO, 3, b'2', IAC, SB, 24, IAC, IAC, 1, IAC, SE, b'\n'] {
            reader.feed(&[b], &mut inputs, &mut replies);
        }
        assert_eq!(inputs, vec![line("2")]);
        assert_eq!(replies, vec![IAC, WONT, 3]);
    }

    #[test]
    fn backspace_delete_and_telnet_erase() {
        let (inputs, _) = read(b"3\x08\x7f1\n12\x08\n");
        assert_eq!(inputs, vec![line("1"), line("1")]);
        let (inputs, _) = read(&[b'7', IAC, EC, b'2', b'x', IAC, EL, b'9', b'\n']);
        assert_eq!(inputs, vec![line("9")]);
    }

    #[test]
    fn an_escaped_iac_is_data() {
        let (inputs, _) = read(&[IAC, IAC, b'\n']);
        assert_eq!(inputs, vec![Input::Line(vec![255])]);
    }

    #[test]
    fn a_subnegotiation_without_its_end_is_bounded() {
        // The option byte and 511 more: at the limit, still waiting.
        let mut bytes = vec![IAC, SB, 24];
        bytes.extend(std::iter::repeat_n(b'x', SUBNEGOTIATION_LIMIT - 1));
        let (inputs, _) = read(&bytes);
        assert!(inputs.is_empty(), "{inputs:?}");
        bytes.extend_from_slice(b"9\r\n");
        let (inputs, _) = read(&bytes);
        assert_eq!(inputs, vec![Input::SubnegotiationTooLong]);
        // Escaped IACs count too: they cannot keep one open forever.
        let mut bytes = vec![IAC, SB, 24];
        bytes.extend(std::iter::repeat_n(IAC, 2 * SUBNEGOTIATION_LIMIT));
        bytes.push(b'9');
        let (inputs, _) = read(&bytes);
        assert_eq!(inputs, vec![Input::SubnegotiationTooLong]);
    }

    #[test]
    fn a_command_inside_a_subnegotiation_ends_it_and_is_obeyed() {
        let (inputs, replies) = read(&[IAC, SB, 31, 0, IAC, DO, 1, b'9', b'\n']);
        assert_eq!(inputs, vec![line("9")]);
        assert_eq!(replies, vec![IAC, WONT, 1]);
    }

    #[test]
    fn decode_stops_at_each_event() {
        let mut reader = LineReader::new(16);
        let mut replies = Vec::new();
        let bytes = [b'1', b'\n', IAC, DO, 1, IAC, WILL, 3, b'2', b'\n'];
        assert_eq!(reader.decode(&bytes, &mut replies), (2, Some(line("1"))));
        assert_eq!(reader.decode(&bytes[2..], &mut replies), (3, None));
        assert_eq!(replies, vec![IAC, WONT, 1]);
        assert_eq!(reader.decode(&bytes[5..], &mut replies), (3, None));
        assert_eq!(
            reader.decode(&bytes[8..], &mut replies),
            (2, Some(line("2")))
        );
        assert_eq!(reader.decode(b"12", &mut replies), (2, None));
    }

    #[test]
    fn over_long_lines_are_reported_at_once() {
        let (inputs, _) = read(&[b'x'; 100]);
        assert_eq!(inputs, vec![Input::TooLong]);
        let (inputs, _) = read(&[b'x'; 16]);
        assert!(inputs.is_empty());
    }
}
