//! Reading lines from a telnet client, or from `nc`.
//!
//! A telnet client may send option negotiation (`IAC DO ECHO`, ...) and
//! subnegotiation (`IAC SB ... IAC SE`) among its keystrokes. These are
//! stripped from the text; every option the client offers or asks for is
//! refused (`WILL x` gets `DONT x`, `DO x` gets `WONT x`), so the client stays
//! in its default line-at-a-time mode with local echo, which suits a menu.
//! Lines end in CR LF, LF, or CR NUL (and a bare CR); backspace, DEL and
//! telnet's erase commands edit the line for clients that send keys raw.

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

/// Something the reader found in the client's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A complete line, without its line end.
    Line(Vec<u8>),
    /// The line grew past the limit before it ended.
    TooLong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Data,
    /// After a CR: a following LF or NUL belongs to the same line end.
    AfterCr,
    Iac,
    Option(u8),
    Sub,
    SubIac,
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

    /// Feeds bytes read from the client. Complete lines go to `inputs`,
    /// bytes to send back (negotiation refusals) to `replies`. After
    /// [`Input::TooLong`] the rest of `bytes` is ignored: the caller closes.
    pub fn feed(&mut self, bytes: &[u8], inputs: &mut Vec<Input>, replies: &mut Vec<u8>) {
        for &b in bytes {
            match self.state {
                State::AfterCr if b == b'\n' || b == 0 => self.state = State::Data,
                State::Data | State::AfterCr => {
                    self.state = State::Data;
                    match b {
                        IAC => self.state = State::Iac,
                        b'\r' => {
                            inputs.push(Input::Line(std::mem::take(&mut self.line)));
                            self.state = State::AfterCr;
                        }
                        b'\n' => inputs.push(Input::Line(std::mem::take(&mut self.line))),
                        0x08 | 0x7f => {
                            self.line.pop();
                        }
                        0 => {}
                        _ => {
                            if !self.push(b, inputs) {
                                return;
                            }
                        }
                    }
                }
                State::Iac => {
                    self.state = State::Data;
                    match b {
                        // IAC IAC is a data byte 255.
                        IAC if !self.push(b, inputs) => return,
                        IAC => {}
                        WILL | WONT | DO | DONT => self.state = State::Option(b),
                        SB => self.state = State::Sub,
                        EC => {
                            self.line.pop();
                        }
                        EL => self.line.clear(),
                        AYT => replies.extend_from_slice(b"\r\n[yes]\r\n"),
                        // NOP, data mark, break, interrupt, abort output, GA:
                        // nothing to do for a menu.
                        _ => {}
                    }
                }
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
                State::Sub => {
                    if b == IAC {
                        self.state = State::SubIac;
                    }
                }
                State::SubIac => {
                    self.state = if b == SE { State::Data } else { State::Sub };
                }
            }
        }
    }

    fn push(&mut self, b: u8, inputs: &mut Vec<Input>) -> bool {
        if self.line.len() >= self.limit {
            self.line.clear();
            inputs.push(Input::TooLong);
            return false;
        }
        self.line.push(b);
        true
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
    fn over_long_lines_are_reported_at_once() {
        let (inputs, _) = read(&[b'x'; 100]);
        assert_eq!(inputs, vec![Input::TooLong]);
        let (inputs, _) = read(&[b'x'; 16]);
        assert!(inputs.is_empty());
    }
}
