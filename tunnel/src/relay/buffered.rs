//! The buffered pump: both directions copied through user space. It works
//! for any stream (TLS included), and between TCP sockets where `splice(2)`
//! is not available.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::pump::{abort, Direction, Failed, Pump};

/// Copies through user space; works for any stream (TLS included).
pub(super) struct Buffered<'a, C: ?Sized, T: ?Sized> {
    client: &'a mut C,
    target: &'a mut T,
    up: Direction,
    down: Direction,
}

impl<'a, C: ?Sized, T: ?Sized> Buffered<'a, C, T> {
    pub(super) fn new(client: &'a mut C, target: &'a mut T) -> Self {
        Buffered {
            client,
            target,
            up: Direction::default(),
            down: Direction::default(),
        }
    }
}

impl<C, T> Pump for Buffered<'_, C, T>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    T: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    fn poll_up(&mut self, cx: &mut Context<'_>, active: &mut bool) -> Poll<Result<(), Failed>> {
        self.up.poll_copy(
            cx,
            Pin::new(&mut *self.client),
            Pin::new(&mut *self.target),
            active,
            false,
        )
    }
    fn poll_down(&mut self, cx: &mut Context<'_>, active: &mut bool) -> Poll<Result<(), Failed>> {
        self.down.poll_copy(
            cx,
            Pin::new(&mut *self.target),
            Pin::new(&mut *self.client),
            active,
            false,
        )
    }
    fn done(&self) -> (bool, bool) {
        (self.up.done(), self.down.done())
    }
    fn bytes(&self) -> (u64, u64) {
        (self.up.bytes, self.down.bytes)
    }
    fn abort(&mut self) {
        // Any stream: there is no socket option to reach. The caller sees
        // the reset in the outcome and can pass it on (see `relay`).
    }
}

/// The buffered pump between two TCP sockets: unlike [`Buffered`] over any
/// stream, it can pass a failure on as a reset of both sockets.
// The pump where splice(2) is not; on Linux only the tests use it.
#[cfg_attr(all(target_os = "linux", not(test)), allow(dead_code))]
pub(super) struct BufferedTcp<'a>(Buffered<'a, TcpStream, TcpStream>);

#[cfg_attr(all(target_os = "linux", not(test)), allow(dead_code))]
impl<'a> BufferedTcp<'a> {
    pub(super) fn new(client: &'a mut TcpStream, target: &'a mut TcpStream) -> Self {
        BufferedTcp(Buffered::new(client, target))
    }
}

impl Pump for BufferedTcp<'_> {
    fn poll_up(&mut self, cx: &mut Context<'_>, active: &mut bool) -> Poll<Result<(), Failed>> {
        self.0.poll_up(cx, active)
    }
    fn poll_down(&mut self, cx: &mut Context<'_>, active: &mut bool) -> Poll<Result<(), Failed>> {
        self.0.poll_down(cx, active)
    }
    fn done(&self) -> (bool, bool) {
        self.0.done()
    }
    fn bytes(&self) -> (u64, u64) {
        self.0.bytes()
    }
    fn abort(&mut self) {
        abort(self.0.client);
        abort(self.0.target);
    }
}
