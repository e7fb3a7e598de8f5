//! A connection's input and output buffers, in pages of their own.
//!
//! Each buffer is an anonymous memory mapping rather than a heap block: its
//! pages come from the system when they are first written and go back to it
//! the moment the buffer is dropped, whatever the allocator would keep for
//! later. A server whose busy clients have left is so back to its start-up
//! size, and a buffer sized for the longest line allowed costs only the
//! pages its longest line so far has touched.

use std::io;
use std::ops::Deref;

use memmap2::MmapMut;

use crate::number::Output;

/// Bytes in pages of their own: written at the end, taken from the front.
#[derive(Debug)]
pub struct PageBuf {
    map: MmapMut,
    len: usize,
}

impl PageBuf {
    /// An empty buffer with room for `capacity` bytes (at least one).
    pub fn with_capacity(capacity: usize) -> io::Result<PageBuf> {
        let map = MmapMut::map_anon(capacity.max(1)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot map a buffer of {capacity} bytes: {e}"),
            )
        })?;
        Ok(PageBuf { map, len: 0 })
    }

    /// Bytes it can hold.
    pub fn capacity(&self) -> usize {
        self.map.len()
    }

    /// The room after the bytes held, to read into; [`PageBuf::filled`]
    /// then says how much was.
    pub fn spare(&mut self) -> &mut [u8] {
        &mut self.map[self.len..]
    }

    /// Counts `count` more bytes, written into [`PageBuf::spare`], as held.
    pub fn filled(&mut self, count: usize) {
        assert!(count <= self.capacity() - self.len, "filled past the end");
        self.len += count;
    }

    /// Takes the first `count` bytes away, moving the rest to the front.
    pub fn consume(&mut self, count: usize) {
        self.map.copy_within(count..self.len, 0);
        self.len -= count;
    }

    /// Takes every byte away; the pages stay mapped for the next ones.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Moves to a mapping with room for `additional` more bytes. Buffers
    /// are sized for the longest answer, so this happens only if that
    /// sizing is wrong.
    #[cold]
    fn grow(&mut self, additional: usize) {
        let needed = self
            .len
            .checked_add(additional)
            .expect("a buffer size fits in memory");
        let mut larger = PageBuf::with_capacity(needed.max(2 * self.capacity()))
            .unwrap_or_else(|e| panic!("{e}"));
        larger.map[..self.len].copy_from_slice(&self.map[..self.len]);
        larger.len = self.len;
        *self = larger;
    }

    /// The `count` bytes after those held, made room for if need be.
    #[inline]
    fn room(&mut self, count: usize) -> &mut [u8] {
        let start = self.len;
        if self.map.len() - start < count {
            self.grow(count);
        }
        &mut self.map[start..start + count]
    }
}

impl Deref for PageBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map[..self.len]
    }
}

impl Output for PageBuf {
    #[inline]
    fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.room(bytes.len()).copy_from_slice(bytes);
        self.len += bytes.len();
    }

    #[inline]
    fn push_repeated(&mut self, byte: u8, count: usize) {
        self.room(count).fill(byte);
        self.len += count;
    }

    #[inline]
    fn push(&mut self, byte: u8) {
        self.room(1)[0] = byte;
        self.len += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_at_the_end_taken_from_the_front() {
        let mut buf = PageBuf::with_capacity(10).unwrap();
        assert!(buf.capacity() >= 10);
        buf.extend_from_slice(b"12\n34");
        buf.push_repeated(b'5', 2);
        assert_eq!(&buf[..], b"12\n3455");
        buf.consume(3);
        assert_eq!(&buf[..], b"3455");
        let room = buf.spare().len();
        buf.spare()[..2].copy_from_slice(b"\n6");
        buf.filled(2);
        assert_eq!(&buf[..], b"3455\n6");
        assert_eq!(buf.spare().len(), room - 2);
        buf.clear();
        assert!(buf.is_empty());
    }

    #[test]
    fn grows_when_sized_too_small() {
        let mut buf = PageBuf::with_capacity(4).unwrap();
        let long = vec![b'7'; 3 * buf.capacity() + 1];
        buf.extend_from_slice(b"ab");
        buf.extend_from_slice(&long);
        assert_eq!(buf.len(), long.len() + 2);
        assert_eq!(&buf[..2], b"ab");
        assert!(buf[2..].iter().all(|&b| b == b'7'));
    }
}
