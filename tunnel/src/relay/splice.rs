//! The Linux pump: bytes move socket → pipe → socket inside the kernel
//! with `splice(2)`, never through user space.
//!
//! A pipe is taken from a per-thread pool only while a direction has data in
//! flight and goes back as soon as it is empty, so an idle connection holds
//! no pipe (and no descriptors beyond its two sockets). If no pipe can be
//! made (descriptor limit), the direction copies through the shared scratch
//! buffer instead.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};

use tokio::io::{AsyncWrite, Interest};
use tokio::net::TcpStream;

use super::pump::{abort, Direction, Failed, Pump};

/// Bytes a pipe holds; one splice moves at most this much.
const PIPE_SIZE: usize = 1 << 20;
/// Empty pipes kept per thread for reuse.
const POOL_MAX: usize = 64;

/// A kernel pipe used as the in-flight buffer of one direction.
#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A bigger pipe means fewer system calls per megabyte; the kernel
        // may refuse (pipe-max-size), and the default 64 KiB still works.
        let capacity = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32))
            .map(|n| n as usize)
            .unwrap_or(64 * 1024);
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }
}

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

fn take_pipe() -> io::Result<Pipe> {
    match POOL.with(|pool| pool.borrow_mut().pop()) {
        Some(pipe) => Ok(pipe),
        None => Pipe::new(),
    }
}

fn give_back(pipe: Pipe) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_MAX {
            pool.push(pipe);
        }
    });
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

fn to_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// One direction between two TCP sockets: small messages are copied
/// through the scratch buffer (one read and one write each, the fewest
/// system calls); once a read fills the buffer the direction carries bulk
/// data and switches to `splice(2)`.
#[derive(Debug, Default)]
struct SpliceDirection {
    /// The copying state; its `read_done`, `shut_down` and `bytes` serve
    /// the spliced mode too.
    buffered: Direction,
    spliced: bool,
    pipe: Option<Pipe>,
    in_pipe: usize,
}

impl SpliceDirection {
    /// Whether this direction has ended (EOF passed on).
    fn done(&self) -> bool {
        self.buffered.done()
    }

    /// Bytes delivered to the receiver.
    fn total(&self) -> u64 {
        self.buffered.bytes
    }

    /// Moves bytes from `src` to `dst` until either would block; Ready once
    /// EOF has been passed on as a shutdown of `dst`'s write side. A failure
    /// says whether reading `src` or writing `dst` failed.
    fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut TcpStream,
        dst: &mut TcpStream,
        active: &mut bool,
    ) -> Poll<Result<(), Failed>> {
        if !self.spliced {
            ready!(self.buffered.poll_copy(
                cx,
                Pin::new(&mut *src),
                Pin::new(&mut *dst),
                active,
                true
            ))?;
            if self.buffered.done() {
                return Poll::Ready(Ok(()));
            }
            // A bulk transfer: from here on the bytes stay in the kernel.
            self.spliced = true;
        }
        let state = &mut self.buffered;
        loop {
            if self.in_pipe > 0 {
                ready!(dst.poll_write_ready(cx)).map_err(Failed::Writing)?;
                let pipe = self.pipe.as_ref().expect("data in flight has a pipe");
                match dst.try_io(Interest::WRITABLE, || {
                    splice(&pipe.read, None, dst.as_fd(), None, self.in_pipe, FLAGS).map_err(to_io)
                }) {
                    Ok(n) => {
                        self.in_pipe -= n;
                        state.bytes += n as u64;
                        *active = true;
                        if self.in_pipe == 0 {
                            give_back(self.pipe.take().expect("pipe"));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // Bytes left in the pipe go with it: it is dropped, not
                    // given back to the pool.
                    Err(e) => return Poll::Ready(Err(Failed::Writing(e))),
                }
                continue;
            }
            if !state.read_done {
                ready!(src.poll_read_ready(cx)).map_err(Failed::Reading)?;
                let pipe = match self.pipe.take().map_or_else(take_pipe, Ok) {
                    Ok(p) => p,
                    Err(e) => {
                        // Out of descriptors, say: copy through memory.
                        tracing::debug!(error = %e, "no pipe for splice; copying through memory");
                        self.spliced = false;
                        state.bulk = false;
                        return state.poll_copy(cx, Pin::new(src), Pin::new(dst), active, false);
                    }
                };
                let result = src.try_io(Interest::READABLE, || {
                    splice(src.as_fd(), None, &pipe.write, None, pipe.capacity, FLAGS)
                        .map_err(to_io)
                });
                match result {
                    Ok(0) => {
                        give_back(pipe);
                        state.read_done = true;
                    }
                    Ok(n) => {
                        self.in_pipe = n;
                        self.pipe = Some(pipe);
                        *active = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => give_back(pipe),
                    Err(e) => {
                        give_back(pipe);
                        return Poll::Ready(Err(Failed::Reading(e)));
                    }
                }
                continue;
            }
            if !state.shut_down {
                ready!(AsyncWrite::poll_shutdown(Pin::new(&mut *dst), cx))
                    .map_err(Failed::Writing)?;
                state.shut_down = true;
            }
            return Poll::Ready(Ok(()));
        }
    }
}

/// Both directions of a spliced relay between two TCP sockets.
pub(super) struct Spliced<'a> {
    client: &'a mut TcpStream,
    target: &'a mut TcpStream,
    up: SpliceDirection,
    down: SpliceDirection,
}

impl<'a> Spliced<'a> {
    pub(super) fn new(client: &'a mut TcpStream, target: &'a mut TcpStream) -> Self {
        Spliced {
            client,
            target,
            up: SpliceDirection::default(),
            down: SpliceDirection::default(),
        }
    }
}

impl Pump for Spliced<'_> {
    fn poll_up(&mut self, cx: &mut Context<'_>, active: &mut bool) -> Poll<Result<(), Failed>> {
        self.up.poll_copy(cx, self.client, self.target, active)
    }
    fn poll_down(&mut self, cx: &mut Context<'_>, active: &mut bool) -> Poll<Result<(), Failed>> {
        self.down.poll_copy(cx, self.target, self.client, active)
    }
    fn done(&self) -> (bool, bool) {
        (self.up.done(), self.down.done())
    }
    fn bytes(&self) -> (u64, u64) {
        (self.up.total(), self.down.total())
    }
    fn abort(&mut self) {
        abort(self.client);
        abort(self.target);
    }
}
