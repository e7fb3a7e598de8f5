//! Connecting to a target: the host name is resolved at every connect (the
//! target may move), and when it has several addresses they race as RFC 8305
//! ("Happy Eyeballs") says, all within one connect timeout. The socket gets
//! `TCP_NODELAY` and keepalive. A probe that only wanted to know the target
//! accepts hangs up politely.
//!
//! The race: the addresses are tried in the resolver's order with the
//! address families interleaved (see [`attempt_order`]); each attempt runs
//! alone for [`ATTEMPT_DELAY`] before the next one starts beside it, or the
//! next starts at once when an attempt fails. The first connection made
//! wins and the attempts still running are dropped, which closes their
//! sockets. A name with one address (and every IP literal) takes the plain
//! path: one connect under one timeout, with no race to set up.

use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use common::settings::HostPort;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Why a target could not be reached, in words for the access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreachable(pub String);

/// How long a connection attempt runs alone before the next address is
/// tried beside it: RFC 8305's recommended Connection Attempt Delay.
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Connects to `target` within `timeout`, which covers the name lookup
/// and every attempt. Returns the socket and the address that accepted it.
pub async fn connect(
    target: &HostPort,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), Unreachable> {
    let deadline = deadline_after(timeout);
    let addrs: Vec<SocketAddr> = match tokio::time::timeout_at(
        deadline,
        tokio::net::lookup_host((target.host.as_str(), target.port)),
    )
    .await
    {
        Err(_) => {
            return Err(Unreachable(format!(
                "{} did not resolve within {timeout:?}",
                target.host
            )))
        }
        Ok(Err(e)) => {
            return Err(Unreachable(format!(
                "{} does not resolve: {e}",
                target.host
            )))
        }
        Ok(Ok(addrs)) => addrs.collect(),
    };
    match addrs[..] {
        [] => Err(Unreachable(format!(
            "{} resolves to no address",
            target.host
        ))),
        // The common case, and the one whose cost per connection is
        // measured: one attempt under the timeout, no task, no second
        // timer, nothing allocated.
        [addr] => match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => Ok((stream, addr)),
            Ok(Err(e)) => Err(Unreachable(format!("{addr}: {}", describe(&e)))),
            Err(_) => Err(Unreachable(format!("{addr}: no answer within {timeout:?}"))),
        },
        _ => {
            let addrs = attempt_order(addrs);
            // Boxed, so that the race's state does not make every
            // connect's future (single-address ones too) larger.
            let won = Box::pin(race_within(
                &target.host,
                &addrs,
                deadline,
                timeout,
                ATTEMPT_DELAY,
                TcpStream::connect::<SocketAddr>,
            ))
            .await?;
            if won.1 != addrs[0] {
                tracing::debug!(host = %target.host, addr = %won.1, first = %addrs[0], "connected to a later address of the target");
            }
            Ok(won)
        }
    }
}

/// The order to try a name's addresses in, as RFC 8305 section 4 says:
/// the resolver's order, with the address families interleaved (one of
/// the first family, one of the other, and so on; IPv4-mapped IPv6
/// addresses count as IPv4), starting with the family of the resolver's
/// first choice. The resolver (the system's `getaddrinfo`) has already
/// sorted the addresses by RFC 6724's destination address selection,
/// which knows the host's routes and source addresses and honours
/// `/etc/gai.conf`: it puts IPv6 first when the host has IPv6 routes to the
/// target and IPv4 first when it has none, so its first choice is kept.
/// An address listed twice is tried once.
pub fn attempt_order(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let is_v6 = |a: &SocketAddr| a.ip().to_canonical().is_ipv6();
    let Some(first_v6) = addrs.first().map(is_v6) else {
        return addrs;
    };
    let (mut first, mut other) = (Vec::new(), Vec::new());
    for addr in addrs {
        let family = if is_v6(&addr) == first_v6 {
            &mut first
        } else {
            &mut other
        };
        if !family.contains(&addr) {
            family.push(addr);
        }
    }
    let mut ordered = Vec::with_capacity(first.len() + other.len());
    let (mut first, mut other) = (first.into_iter(), other.into_iter());
    loop {
        match (first.next(), other.next()) {
            (None, None) => return ordered,
            (a, b) => ordered.extend(a.into_iter().chain(b)),
        }
    }
}

/// What became of one address of a race.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// The race ended before its turn.
    NotTried,
    /// Its attempt was still running when the race ended.
    Running,
    /// Its attempt failed, for this reason.
    Failed(String),
}

/// Races `attempt`s to `addrs` (in order, [`ATTEMPT_DELAY`] apart in
/// production) until one connects or `deadline`; the error names every
/// address and what became of it. Generic over the attempt so that the
/// timing can be tested without a network.
async fn race_within<S, F>(
    host: &str,
    addrs: &[SocketAddr],
    deadline: Instant,
    timeout: Duration,
    delay: Duration,
    attempt: impl FnMut(SocketAddr) -> F,
) -> Result<(S, SocketAddr), Unreachable>
where
    F: Future<Output = io::Result<S>>,
{
    let mut outcomes = vec![Outcome::NotTried; addrs.len()];
    let raced = tokio::time::timeout_at(deadline, race(addrs, delay, &mut outcomes, attempt)).await;
    match raced {
        Ok(Some(won)) => Ok(won),
        Ok(None) | Err(_) => Err(Unreachable(explain(host, addrs, &outcomes, timeout))),
    }
}

/// The race itself: starts an attempt for `addrs[0]`, then one for the
/// next address whenever `delay` has passed since the last start or an
/// attempt has failed, and polls those running. Returns the first
/// connection made, or `None` when every attempt has failed; `outcomes`
/// says what became of each address (the caller reads it after a timeout
/// dropped the race). Dropping the race drops the attempts still running.
async fn race<S, F>(
    addrs: &[SocketAddr],
    delay: Duration,
    outcomes: &mut [Outcome],
    mut attempt: impl FnMut(SocketAddr) -> F,
) -> Option<(S, SocketAddr)>
where
    F: Future<Output = io::Result<S>>,
{
    let mut running: Vec<(usize, Pin<Box<F>>)> = Vec::with_capacity(addrs.len());
    let mut next = 0;
    let mut start_now = true;
    let stagger = tokio::time::sleep(delay);
    tokio::pin!(stagger);
    std::future::poll_fn(|cx| loop {
        // Polling the timer when no start is forced registers the wake-up
        // for the next one.
        if next < addrs.len()
            && (std::mem::take(&mut start_now) || stagger.as_mut().poll(cx).is_ready())
        {
            running.push((next, Box::pin(attempt(addrs[next]))));
            outcomes[next] = Outcome::Running;
            next += 1;
            stagger.as_mut().reset(Instant::now() + delay);
            continue;
        }
        let mut failed = false;
        let mut i = 0;
        while i < running.len() {
            let (at, ref mut connecting) = running[i];
            match connecting.as_mut().poll(cx) {
                Poll::Pending => i += 1,
                Poll::Ready(Ok(stream)) => return Poll::Ready(Some((stream, addrs[at]))),
                Poll::Ready(Err(e)) => {
                    outcomes[at] = Outcome::Failed(describe(&e));
                    running.swap_remove(i);
                    failed = true;
                }
            }
        }
        if failed && next < addrs.len() {
            start_now = true;
        } else if running.is_empty() {
            return Poll::Ready(None);
        } else {
            return Poll::Pending;
        }
    })
    .await
}

/// The access log's words for a lost race: every address, and what became
/// of it.
fn explain(host: &str, addrs: &[SocketAddr], outcomes: &[Outcome], timeout: Duration) -> String {
    let mut why = format!("no address of {host} connected:");
    for (i, (addr, outcome)) in addrs.iter().zip(outcomes).enumerate() {
        let sep = if i == 0 { " " } else { ", " };
        let _ = match outcome {
            Outcome::Failed(e) => write!(why, "{sep}{addr}: {e}"),
            Outcome::Running => write!(why, "{sep}{addr}: no answer within {timeout:?}"),
            Outcome::NotTried => write!(why, "{sep}{addr}: not tried within {timeout:?}"),
        };
    }
    why
}

/// The instant `after` from now; a duration beyond the clock's range (a
/// timeout written as "never") gives a far future instead of a panic.
fn deadline_after(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after).unwrap_or_else(|| now + FAR_FUTURE)
}

/// Later than any wait needs: about 30 years, as tokio's own timers use.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

fn describe(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::TimedOut => "timed out".into(),
        _ => e.to_string(),
    }
}

/// Sets what every relayed socket needs: no Nagle delay (interactive
/// protocols such as PostgreSQL's would wait for delayed ACKs) and, when
/// configured, keepalive probes so dead peers are found.
pub fn tune(stream: &TcpStream, keepalive: Option<Duration>) {
    let _ = stream.set_nodelay(true);
    if let Some(time) = keepalive {
        let _ = SockRef::from(stream).set_tcp_keepalive(&probes(time));
    }
}

fn probes(time: Duration) -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(time)
        .with_interval(Duration::from_secs(10).min(time))
}

/// [`tune`] for a client socket from the shared accept loop, which has
/// given it `TCP_NODELAY` already (inherited from the listener, or set).
pub fn tune_accepted(stream: &TcpStream, keepalive: Option<Duration>) {
    if let Some(time) = keepalive {
        let _ = SockRef::from(stream).set_tcp_keepalive(&probes(time));
    }
}

/// Gives `listener` the keepalive probes of [`tune`] (or none), which every
/// socket it accepts then inherits (Linux): the connections need no system
/// call of their own for them. Whether it took.
pub fn keepalive_on_listener<L: std::os::fd::AsFd>(
    listener: &L,
    keepalive: Option<Duration>,
) -> bool {
    if !cfg!(target_os = "linux") {
        return false;
    }
    let socket = SockRef::from(listener);
    match keepalive {
        Some(time) => socket.set_tcp_keepalive(&probes(time)).is_ok(),
        None => socket.set_keepalive(false).is_ok(),
    }
}

/// Most bytes [`close_politely`] reads before it stops listening.
const CLOSE_READ_MAX: usize = 64 * 1024;

/// Ends a probe's connection (a health check, a readiness wait) the way an
/// ordinary client does: send our end of stream, read and discard until the
/// server closes (at most `within` and 64 KiB), then close. Dropping the
/// socket at once would make a server that greets its clients write into a
/// closed connection and get a reset, which it would log as an error.
pub async fn close_politely(mut stream: TcpStream, within: Duration) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut buf = [0u8; 1024];
    let mut left = CLOSE_READ_MAX;
    let _ = tokio::time::timeout(within, async {
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn families_interleave_from_the_resolvers_first_choice() {
        let v6_first = addrs(&[
            "[2001:db8::1]:80",
            "[2001:db8::2]:80",
            "[2001:db8::3]:80",
            "192.0.2.1:80",
            "192.0.2.2:80",
        ]);
        assert_eq!(
            attempt_order(v6_first),
            addrs(&[
                "[2001:db8::1]:80",
                "192.0.2.1:80",
                "[2001:db8::2]:80",
                "192.0.2.2:80",
                "[2001:db8::3]:80"
            ])
        );
        // A resolver that put IPv4 first (no IPv6 route, or gai.conf) is
        // followed.
        let v4_first = addrs(&["192.0.2.1:80", "192.0.2.2:80", "[2001:db8::1]:80"]);
        assert_eq!(
            attempt_order(v4_first),
            addrs(&["192.0.2.1:80", "[2001:db8::1]:80", "192.0.2.2:80"])
        );
    }

    #[test]
    fn one_family_keeps_its_order_and_duplicates_go() {
        let v4 = addrs(&["192.0.2.3:80", "192.0.2.1:80", "192.0.2.2:80"]);
        assert_eq!(attempt_order(v4.clone()), v4);
        let twice = addrs(&[
            "[2001:db8::1]:80",
            "192.0.2.1:80",
            "[2001:db8::1]:80",
            "192.0.2.1:80",
            "192.0.2.2:80",
        ]);
        assert_eq!(
            attempt_order(twice),
            addrs(&["[2001:db8::1]:80", "192.0.2.1:80", "192.0.2.2:80"])
        );
        assert_eq!(attempt_order(Vec::new()), Vec::new());
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_ipv4() {
        let mapped = addrs(&[
            "[2001:db8::1]:80",
            "[::ffff:192.0.2.1]:80",
            "[2001:db8::2]:80",
            "192.0.2.2:80",
        ]);
        assert_eq!(
            attempt_order(mapped),
            addrs(&[
                "[2001:db8::1]:80",
                "[::ffff:192.0.2.1]:80",
                "[2001:db8::2]:80",
                "192.0.2.2:80"
            ])
        );
    }

    /// What a fake attempt does.
    #[derive(Debug, Clone, Copy)]
    enum Plan {
        /// Never answers (a blackhole).
        Hang,
        /// Refused after this many milliseconds.
        Refuse(u64),
        /// Accepted after this many milliseconds.
        Accept(u64),
    }

    /// Counts the attempts started and those dropped before they ended.
    #[derive(Debug, Default)]
    struct Counts {
        started: AtomicUsize,
        dropped: AtomicUsize,
    }

    struct Unfinished(Arc<Counts>);
    impl Drop for Unfinished {
        fn drop(&mut self) {
            self.0.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A connection attempt that follows `plan`; its "stream" is the
    /// address it reached.
    async fn fake(addr: SocketAddr, plan: Plan, counts: Arc<Counts>) -> io::Result<SocketAddr> {
        counts.started.fetch_add(1, Ordering::SeqCst);
        let guard = Unfinished(counts);
        let result = match plan {
            Plan::Hang => std::future::pending().await,
            Plan::Refuse(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Err(io::ErrorKind::ConnectionRefused.into())
            }
            Plan::Accept(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(addr)
            }
        };
        std::mem::forget(guard);
        result
    }

    /// Races fake attempts (the plan by address) under `timeout`; returns
    /// the outcome, the time it took and the counts.
    async fn run(
        plans: &[(&str, Plan)],
        timeout: Duration,
    ) -> (Result<SocketAddr, Unreachable>, Duration, Arc<Counts>) {
        let plans: Vec<(SocketAddr, Plan)> = plans
            .iter()
            .map(|(a, p)| (a.parse().unwrap(), *p))
            .collect();
        let list: Vec<SocketAddr> = plans.iter().map(|(a, _)| *a).collect();
        let counts = Arc::new(Counts::default());
        let started = Instant::now();
        let result = race_within(
            "dual.example",
            &list,
            started + timeout,
            timeout,
            ATTEMPT_DELAY,
            |addr| {
                let plan = plans.iter().find(|(a, _)| *a == addr).unwrap().1;
                fake(addr, plan, counts.clone())
            },
        )
        .await;
        let result = result.map(|(stream, addr)| {
            assert_eq!(stream, addr, "the result names the address that won");
            addr
        });
        (result, started.elapsed(), counts)
    }

    const V6: &str = "[2001:db8::1]:5432";
    const V4: &str = "192.0.2.1:5432";

    #[tokio::test(start_paused = true)]
    async fn a_silent_first_address_gives_way_after_250ms() {
        let (won, took, counts) = run(
            &[(V6, Plan::Hang), (V4, Plan::Accept(10))],
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(won.unwrap(), V4.parse().unwrap());
        assert_eq!(took, Duration::from_millis(260));
        // The IPv6 attempt was cancelled, not left running.
        assert_eq!(counts.started.load(Ordering::SeqCst), 2);
        assert_eq!(counts.dropped.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_address_starts_the_next_at_once() {
        let (won, took, _) = run(
            &[(V6, Plan::Refuse(5)), (V4, Plan::Accept(10))],
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(won.unwrap(), V4.parse().unwrap());
        assert_eq!(took, Duration::from_millis(15));
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_connection_made_wins_not_the_first_started() {
        // IPv6 would answer at 400 ms; IPv4, started at 250, answers at 260.
        let (won, took, counts) = run(
            &[(V6, Plan::Accept(400)), (V4, Plan::Accept(10))],
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(won.unwrap(), V4.parse().unwrap());
        assert_eq!(took, Duration::from_millis(260));
        assert_eq!(counts.dropped.load(Ordering::SeqCst), 1);
        // A fast first address never starts the second.
        let (won, took, counts) = run(
            &[(V6, Plan::Accept(100)), (V4, Plan::Accept(10))],
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(won.unwrap(), V6.parse().unwrap());
        assert_eq!(took, Duration::from_millis(100));
        assert_eq!(counts.started.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_timeout_covers_the_whole_race_and_every_address_is_named() {
        let (failed, took, counts) = run(
            &[
                ("[2001:db8::1]:80", Plan::Hang),
                ("192.0.2.1:80", Plan::Refuse(5)),
                ("[2001:db8::2]:80", Plan::Hang),
                ("192.0.2.2:80", Plan::Hang),
                ("[2001:db8::3]:80", Plan::Hang),
            ],
            Duration::from_millis(600),
        )
        .await;
        // Started at 0, 250 (refused at 255), 255 and 505 ms; the fifth
        // would have started at 755. All given up at 600.
        assert_eq!(took, Duration::from_millis(600));
        assert_eq!(counts.started.load(Ordering::SeqCst), 4);
        assert_eq!(counts.dropped.load(Ordering::SeqCst), 3);
        assert_eq!(
            failed.unwrap_err().0,
            "no address of dual.example connected: [2001:db8::1]:80: no answer within 600ms, \
             192.0.2.1:80: connection refused, [2001:db8::2]:80: no answer within 600ms, \
             192.0.2.2:80: no answer within 600ms, [2001:db8::3]:80: not tried within 600ms"
        );
        // Too short a timeout for every address to get its turn.
        let (failed, took, _) = run(
            &[
                (V6, Plan::Hang),
                (V4, Plan::Hang),
                ("[2001:db8::2]:5432", Plan::Hang),
            ],
            Duration::from_millis(300),
        )
        .await;
        assert_eq!(took, Duration::from_millis(300));
        assert_eq!(
            failed.unwrap_err().0,
            "no address of dual.example connected: [2001:db8::1]:5432: no answer within 300ms, \
             192.0.2.1:5432: no answer within 300ms, [2001:db8::2]:5432: not tried within 300ms"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn when_every_address_fails_the_race_ends_without_waiting() {
        let (failed, took, _) = run(
            &[(V6, Plan::Refuse(5)), (V4, Plan::Refuse(20))],
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(took, Duration::from_millis(25));
        assert_eq!(
            failed.unwrap_err().0,
            "no address of dual.example connected: [2001:db8::1]:5432: connection refused, \
             192.0.2.1:5432: connection refused"
        );
    }

    /// The race over real loopback sockets: nothing listens on the first
    /// address, so the second is tried at once, not 250 ms later.
    #[tokio::test]
    async fn real_sockets_race_and_name_the_winner() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        // A port that was free a moment ago on 127.0.0.2: refused.
        let closed = std::net::TcpListener::bind("127.0.0.2:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let list = [closed, open];
        let started = std::time::Instant::now();
        let (stream, addr) = race_within(
            "two.example",
            &list,
            Instant::now() + Duration::from_secs(5),
            Duration::from_secs(5),
            ATTEMPT_DELAY,
            TcpStream::connect::<SocketAddr>,
        )
        .await
        .unwrap();
        assert!(started.elapsed() < Duration::from_millis(200));
        assert_eq!(addr, open);
        assert_eq!(stream.peer_addr().unwrap(), open);
        let (accepted, _) = listener.accept().await.unwrap();
        assert_eq!(accepted.local_addr().unwrap(), open);
    }
}
