//! Per-source limits: at most so many connections at once, and so many new
//! connections a second, from one client address or network prefix.
//!
//! A [`PerSource`] keeps one small entry per source (an address, or the
//! `/prefix_v4` or `/prefix_v6` network it is in): how many of its
//! connections are open, and its token bucket, kept as the one instant at
//! which the bucket is full again (a token costs `1/rate` of time; a
//! connection is let in while the bucket holds a token, that is while the
//! instant is less than `burst` tokens ahead of now). The accept path asks
//! [`PerSource::admit`] with the client's address once it knows it; a
//! [`SourcePermit`] holds the connection's place and gives it back on drop.
//!
//! The table is bounded: at most `max_sources` entries are kept, and a new
//! source takes the place of the one least recently seen among those with
//! no connection open (forgetting a bucket that may not be full yet: the
//! price of a bound when more sources come than it holds). Entries with a
//! connection open are never dropped, so the table holds at most
//! `max_sources` entries plus one per open connection, and the connection
//! cap bounds those. Entries that have nothing left to remember (no
//! connection, a full bucket) are dropped as new clients come, so the
//! count of sources falls after a flood (the memory taken stays, within
//! the bound). See [`PerSource::memory`] for the bytes.
//!
//! Refusals are logged sparingly, so a flood cannot flood the log: at most
//! one line a second for each source and [`LOG_LINES_PER_SECOND`] lines a
//! second in all; each line says how many refusals went unlogged since the
//! one before (the counters in [`PerSourceStats`] have them all).

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use crate::settings::{deserialize_text, Period, TextValue};

/// Most refusal lines a limiter logs a second, over all its sources.
pub const LOG_LINES_PER_SECOND: u32 = 10;

/// Most new connections a second a rate may allow: more is no limit.
pub const MAX_RATE_PER_SECOND: u64 = 1_000_000;

/// The default bound of the table of sources (see [`PerSource::memory`]).
pub const DEFAULT_MAX_SOURCES: usize = 50_000;

/// A number of events per period: `10/s`, `600/min`, `5/10s`; a bare
/// number is per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    /// Events in each period, at least 1.
    pub count: u32,
    /// The period, longer than zero.
    pub per: Duration,
}

impl Rate {
    /// `count` events a second.
    pub const fn per_second(count: u32) -> Rate {
        Rate {
            count,
            per: Duration::from_secs(1),
        }
    }

    /// The time one event costs (one token of the bucket), in nanoseconds.
    fn interval_nanos(self) -> u64 {
        (self.per.as_nanos() / u128::from(self.count)).min(u128::from(u64::MAX)) as u64
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.per.as_secs() {
            _ if self.per.subsec_nanos() != 0 => {
                write!(f, "{}/{}", self.count, humantime::format_duration(self.per))
            }
            1 => write!(f, "{}/s", self.count),
            60 => write!(f, "{}/min", self.count),
            3600 => write!(f, "{}/h", self.count),
            _ => write!(f, "{}/{}", self.count, humantime::format_duration(self.per)),
        }
    }
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "write a rate like 10/s, 600/min or 5/10s";
        let s = s.trim();
        let (count, per) = s.split_once('/').unwrap_or((s, "s"));
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| format!("{count:?} is not a whole number of connections; {usage}"))?;
        if count == 0 {
            return Err(format!(
                "a rate of 0 would refuse every connection; leave rate out for no rate limit, or {usage}"
            ));
        }
        let per = per.trim();
        // `s`, `min`, `hour` are one of the unit; `10s` is a duration.
        let per = if per.starts_with(|c: char| c.is_ascii_digit()) {
            per.parse::<Period>()
        } else {
            format!("1{per}").parse::<Period>()
        }
        .map_err(|_| format!("{per:?} is not a period; {usage}"))?
        .0;
        if per.is_zero() {
            return Err(format!("the period must be longer than 0; {usage}"));
        }
        let rate = Rate { count, per };
        if u128::from(count) * 1_000_000_000 > u128::from(MAX_RATE_PER_SECOND) * per.as_nanos() {
            return Err(format!(
                "{rate} is more than {MAX_RATE_PER_SECOND} connections a second, which limits nothing; leave rate out, or write a lower one"
            ));
        }
        Ok(rate)
    }
}

impl TextValue for Rate {
    const EXPECTING: &'static str = "a rate such as 10/s or 600/min";
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_text(d)
    }
}

/// Per-source limits as configured (`per_source:` in YAML,
/// `<PREFIX>_PER_SOURCE__RATE` and so on in the environment). With neither
/// `max_connections` nor `rate` they are off, the default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "WrittenPerSource")]
pub struct PerSourceSettings {
    /// Most connections open at once from one source.
    pub max_connections: Option<u32>,
    /// Most new connections from one source over time (a token bucket
    /// refilled at this rate).
    pub rate: Option<Rate>,
    /// With `rate`: how many new connections a source may open at once
    /// before the rate holds it back (the bucket's size; default: the
    /// rate's count, so `10/s` lets ten in at once).
    pub burst: Option<u32>,
    /// IPv4 clients in one network of this prefix length are one source
    /// (32: each address).
    pub prefix_v4: u8,
    /// IPv6 clients in one network of this prefix length are one source
    /// (64: each subnet, as one host usually has a whole /64).
    pub prefix_v6: u8,
    /// Most sources remembered at once (more evict the least recently
    /// seen); bounds the memory a flood of addresses can take.
    pub max_sources: usize,
}

impl Default for PerSourceSettings {
    fn default() -> Self {
        PerSourceSettings {
            max_connections: None,
            rate: None,
            burst: None,
            prefix_v4: 32,
            prefix_v6: 64,
            max_sources: DEFAULT_MAX_SOURCES,
        }
    }
}

impl PerSourceSettings {
    /// Whether any limit is set.
    pub fn is_on(&self) -> bool {
        self.max_connections.is_some() || self.rate.is_some()
    }

    /// The bucket's size: `burst`, else the rate's count.
    pub fn burst(&self) -> u32 {
        self.burst
            .or(self.rate.map(|r| r.count))
            .unwrap_or(1)
            .max(1)
    }

    /// The limiter these settings ask for (`None` when they are off),
    /// with fresh counters.
    pub fn limiter(&self) -> Option<Arc<PerSource>> {
        self.is_on()
            .then(|| PerSource::new(self.clone(), Arc::default()))
    }
}

/// [`PerSourceSettings`] as read: each field checked alone, then
/// together ([`TryFrom`]). Messages name the field themselves: inside a
/// flattened struct (a program's serving settings) an error carries no
/// key below `per_source`.
#[derive(Deserialize)]
#[serde(default)]
struct WrittenPerSource {
    #[serde(deserialize_with = "max_connections")]
    max_connections: Option<u32>,
    rate: Option<Rate>,
    #[serde(deserialize_with = "burst")]
    burst: Option<u32>,
    #[serde(deserialize_with = "prefix_v4")]
    prefix_v4: u8,
    #[serde(deserialize_with = "prefix_v6")]
    prefix_v6: u8,
    #[serde(deserialize_with = "max_sources")]
    max_sources: usize,
}

fn max_connections<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    match Option::<u32>::deserialize(d)? {
        Some(0) => Err(serde::de::Error::custom(
            "max_connections must be at least 1 (0 would refuse everyone); leave it out for no limit on connections at once",
        )),
        n => Ok(n),
    }
}

fn burst<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    match Option::<u32>::deserialize(d)? {
        Some(0) => Err(serde::de::Error::custom(
            "burst must be at least 1 (0 would refuse everyone); leave it out for the rate's count",
        )),
        n => Ok(n),
    }
}

fn prefix_v4<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    let n = u64::deserialize(d)?;
    u8::try_from(n).ok().filter(|n| (1..=32).contains(n)).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "prefix_v4 {n} is not an IPv4 prefix length; write 1 to 32 (32: each address is a source)"
        ))
    })
}

fn prefix_v6<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    let n = u64::deserialize(d)?;
    u8::try_from(n).ok().filter(|n| (1..=128).contains(n)).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "prefix_v6 {n} is not an IPv6 prefix length; write 1 to 128 (64: each subnet is a source)"
        ))
    })
}

/// The most `max_sources`: slots are numbered in 32 bits.
pub const MAX_SOURCES_LIMIT: usize = 100_000_000;

fn max_sources<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = u64::deserialize(d)?;
    usize::try_from(n)
        .ok()
        .filter(|n| (1..=MAX_SOURCES_LIMIT).contains(n))
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "max_sources {n} is out of range; write 1 to {MAX_SOURCES_LIMIT} (default {DEFAULT_MAX_SOURCES}, about 2.5 MB)"
            ))
        })
}

impl Default for WrittenPerSource {
    fn default() -> Self {
        let d = PerSourceSettings::default();
        WrittenPerSource {
            max_connections: d.max_connections,
            rate: d.rate,
            burst: d.burst,
            prefix_v4: d.prefix_v4,
            prefix_v6: d.prefix_v6,
            max_sources: d.max_sources,
        }
    }
}

impl TryFrom<WrittenPerSource> for PerSourceSettings {
    type Error = String;
    fn try_from(w: WrittenPerSource) -> Result<Self, String> {
        if w.burst.is_some() && w.rate.is_none() {
            return Err("burst is the size of the rate's bucket and no rate is set; add rate (such as 10/s) or remove burst".into());
        }
        Ok(PerSourceSettings {
            max_connections: w.max_connections,
            rate: w.rate,
            burst: w.burst,
            prefix_v4: w.prefix_v4,
            prefix_v6: w.prefix_v6,
            max_sources: w.max_sources,
        })
    }
}

/// A limiter's counters: refusals by limit, and the sources tracked. A
/// limiter may be replaced while its counters go on (a tunnel route whose
/// limits change on a reload), so they live apart from it.
#[derive(Debug, Default)]
pub struct PerSourceStats {
    refused_connections: AtomicU64,
    refused_rate: AtomicU64,
    sources: AtomicU64,
}

impl PerSourceStats {
    /// Clients refused because their source had `max_connections` open.
    pub fn refused_connections(&self) -> u64 {
        self.refused_connections.load(Ordering::Relaxed)
    }

    /// Clients refused because their source exceeded its rate.
    pub fn refused_rate(&self) -> u64 {
        self.refused_rate.load(Ordering::Relaxed)
    }

    /// Sources remembered now, over every limiter counting here.
    pub fn sources(&self) -> u64 {
        self.sources.load(Ordering::Relaxed)
    }
}

/// The source a client counts under: its address, or the network of the
/// configured prefix length it is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source {
    /// The network's address (the client's own at full length).
    pub addr: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == full {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

/// Which limit refused a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Its source had this many connections open, the most allowed.
    Connections(u32),
    /// Its source opened connections faster than the rate, its burst spent.
    Rate {
        /// The rate.
        rate: Rate,
        /// The bucket's size.
        burst: u32,
    },
}

impl Limit {
    /// A short name for metrics labels: `connections` or `rate`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Limit::Connections(_) => "connections",
            Limit::Rate { .. } => "rate",
        }
    }
}

/// A client the limits refused: close its connection at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The source it counts under.
    pub source: Source,
    /// The limit it met.
    pub limit: Limit,
    /// `Some(n)` when this refusal is to be logged, `n` being the refusals
    /// not logged since the previous line; `None` when it is to go
    /// unlogged (it is counted all the same).
    pub log: Option<u64>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.limit {
            Limit::Connections(max) => write!(
                f,
                "{} has {max} connection{} open, the most allowed per source",
                self.source,
                if max == 1 { "" } else { "s" }
            )?,
            Limit::Rate { rate, burst } => write!(
                f,
                "{} opens connections faster than {rate} (burst {burst})",
                self.source
            )?,
        }
        match self.log {
            Some(n) if n > 0 => write!(f, "; {n} more refusals since the last line"),
            _ => Ok(()),
        }
    }
}

impl Refusal {
    /// Logs the refusal of connection `id` from `peer` when it is one to
    /// log (see [`Refusal::log`]): `refused: per-source limit`.
    pub fn log_line(&self, id: u64, peer: SocketAddr, via: Option<SocketAddr>) {
        if let Some(unlogged) = self.log {
            tracing::info!(
                conn = id,
                %peer,
                via = via.map(tracing::field::display),
                source = %self.source,
                limit = self.limit.as_str(),
                unlogged,
                detail = %self,
                "refused: per-source limit"
            );
        }
    }
}

/// Where no slot is: the end of a list.
const NONE: u32 = u32::MAX;

/// A source's key: its network address as IPv6 (IPv4 as `::ffff:a.b.c.d`,
/// which no canonical IPv6 client address has), as two words so that an
/// entry needs no 16-byte alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key([u64; 2]);

/// One source's entry.
#[derive(Debug, Clone, Copy)]
struct Slot {
    key: Key,
    /// When its bucket is full again, in nanoseconds since the epoch.
    full_at: u64,
    /// Its connections open now.
    active: u32,
    /// Neighbours in the idle list (entries with no connection open, least
    /// recently seen first), or the next free slot.
    prev: u32,
    next: u32,
    /// When its last refusal line was logged, in milliseconds since the
    /// epoch (wrapping).
    last_line: u32,
}

/// The limits in force, in the table's units.
#[derive(Debug, Clone)]
struct Limits {
    settings: PerSourceSettings,
    /// A token's time, and how far ahead of now the full instant may be
    /// for a token to be left (`burst - 1` tokens), in nanoseconds.
    rate: Option<(u64, u64)>,
}

impl Limits {
    fn new(settings: PerSourceSettings) -> Limits {
        let rate = settings.rate.map(|r| {
            let interval = r.interval_nanos();
            (
                interval,
                interval.saturating_mul(u64::from(settings.burst() - 1)),
            )
        });
        Limits { settings, rate }
    }

    fn source(&self, ip: IpAddr) -> (Key, Source) {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let prefix = self.settings.prefix_v4.min(32);
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                let net = std::net::Ipv4Addr::from(u32::from(v4) & mask);
                let bits = net.to_ipv6_mapped().to_bits();
                let source = Source {
                    addr: IpAddr::V4(net),
                    prefix,
                };
                (Key([(bits >> 64) as u64, bits as u64]), source)
            }
            IpAddr::V6(v6) => {
                let prefix = self.settings.prefix_v6.min(128);
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                let bits = v6.to_bits() & mask;
                let source = Source {
                    addr: IpAddr::V6(Ipv6Addr::from_bits(bits)),
                    prefix,
                };
                (Key([(bits >> 64) as u64, bits as u64]), source)
            }
        }
    }
}

/// The index from a key to its slot: open addressing with linear probing,
/// at most half full, a removal shifting the entries after it back (no
/// tombstones), so its size depends only on the most entries it ever
/// held. Keys are hashed with a random key (SipHash), so clients cannot
/// choose addresses that collide.
struct Index {
    /// Slot numbers, `NONE` where empty; a power of two long.
    buckets: Vec<u32>,
    len: usize,
    hasher: RandomState,
}

impl Index {
    fn new() -> Index {
        Index {
            buckets: Vec::new(),
            len: 0,
            hasher: RandomState::new(),
        }
    }

    fn home(&self, key: &Key) -> usize {
        (self.hasher.hash_one(key) as usize) & (self.buckets.len() - 1)
    }

    /// Where `key` is in the buckets.
    fn find(&self, key: &Key, slots: &[Slot]) -> Option<usize> {
        if self.buckets.is_empty() {
            return None;
        }
        let mask = self.buckets.len() - 1;
        let mut at = self.home(key);
        loop {
            match self.buckets[at] {
                NONE => return None,
                slot if slots[slot as usize].key == *key => return Some(at),
                _ => at = (at + 1) & mask,
            }
        }
    }

    /// Adds `slot`, whose key is not in the index.
    fn insert(&mut self, slot: u32, slots: &[Slot]) {
        if (self.len + 1) * 2 > self.buckets.len() {
            let size = (self.buckets.len() * 2).max(16);
            let old = std::mem::replace(&mut self.buckets, vec![NONE; size]);
            for s in old.into_iter().filter(|s| *s != NONE) {
                self.place(s, slots);
            }
        }
        self.place(slot, slots);
        self.len += 1;
    }

    fn place(&mut self, slot: u32, slots: &[Slot]) {
        let mask = self.buckets.len() - 1;
        let mut at = self.home(&slots[slot as usize].key);
        while self.buckets[at] != NONE {
            at = (at + 1) & mask;
        }
        self.buckets[at] = slot;
    }

    /// Removes the entry at bucket `at`, moving back the entries after it
    /// that would no longer be found past the hole.
    fn remove(&mut self, mut at: usize, slots: &[Slot]) {
        let mask = self.buckets.len() - 1;
        self.buckets[at] = NONE;
        self.len -= 1;
        let mut next = at;
        loop {
            next = (next + 1) & mask;
            let slot = self.buckets[next];
            if slot == NONE {
                return;
            }
            let home = self.home(&slots[slot as usize].key);
            // It stays when its home is cyclically within (at, next].
            let stays = if at < next {
                at < home && home <= next
            } else {
                at < home || home <= next
            };
            if !stays {
                self.buckets[at] = slot;
                self.buckets[next] = NONE;
                at = next;
            }
        }
    }

    fn bytes(&self) -> usize {
        self.buckets.capacity() * std::mem::size_of::<u32>()
    }
}

/// The table of sources.
struct Table {
    limits: Limits,
    index: Index,
    slots: Vec<Slot>,
    /// First free slot, chained through `next`.
    free: u32,
    /// The idle list's ends.
    head: u32,
    tail: u32,
    /// The bucket of refusal lines, as its full instant.
    lines_full_at: u64,
    /// Refusals not logged since the last line.
    unlogged: u64,
}

impl Table {
    fn unlink(&mut self, at: u32) {
        let Slot { prev, next, .. } = self.slots[at as usize];
        if prev == NONE {
            self.head = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NONE {
            self.tail = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
        let slot = &mut self.slots[at as usize];
        slot.prev = NONE;
        slot.next = NONE;
    }

    fn push_idle(&mut self, at: u32) {
        let tail = self.tail;
        {
            let slot = &mut self.slots[at as usize];
            slot.prev = tail;
            slot.next = NONE;
        }
        if tail == NONE {
            self.head = at;
        } else {
            self.slots[tail as usize].next = at;
        }
        self.tail = at;
    }

    /// Drops the idle entry at `at`.
    fn remove(&mut self, at: u32, stats: &PerSourceStats) {
        self.unlink(at);
        let key = self.slots[at as usize].key;
        if let Some(bucket) = self.index.find(&key, &self.slots) {
            self.index.remove(bucket, &self.slots);
        }
        self.slots[at as usize].next = self.free;
        self.free = at;
        stats.sources.fetch_sub(1, Ordering::Relaxed);
    }

    /// Drops up to `n` of the least recently seen entries that have
    /// nothing left to remember: no connection, a full bucket, no line
    /// logged within the last second.
    fn sweep(&mut self, now: u64, n: usize, stats: &PerSourceStats) {
        for _ in 0..n {
            let head = self.head;
            if head == NONE {
                return;
            }
            let slot = self.slots[head as usize];
            if slot.full_at > now || millis(now).wrapping_sub(slot.last_line) < 1000 {
                return;
            }
            self.remove(head, stats);
        }
    }

    /// A new entry for `key`, taking the place of the least recently seen
    /// idle one when the table is full.
    fn insert(&mut self, key: Key, now: u64, stats: &PerSourceStats) -> u32 {
        while self.index.len >= self.limits.settings.max_sources && self.head != NONE {
            self.remove(self.head, stats);
        }
        let slot = Slot {
            key,
            full_at: 0,
            active: 0,
            prev: NONE,
            next: NONE,
            last_line: millis(now).wrapping_sub(1000),
        };
        let at = if self.free != NONE {
            let at = self.free;
            self.free = self.slots[at as usize].next;
            self.slots[at as usize] = slot;
            at
        } else {
            if self.slots.len() == self.slots.capacity() {
                // Grow by doubling, but never past the bound: the vector's
                // spare room is memory too.
                let room = self
                    .limits
                    .settings
                    .max_sources
                    .saturating_sub(self.slots.len())
                    .max(1);
                self.slots.reserve_exact(self.slots.len().max(16).min(room));
            }
            self.slots.push(slot);
            (self.slots.len() - 1) as u32
        };
        self.index.insert(at, &self.slots);
        stats.sources.fetch_add(1, Ordering::Relaxed);
        at
    }

    /// Whether a refusal now is to be logged: `Some(unlogged)` if so.
    fn log_verdict(&mut self, at: u32, now: u64) -> Option<u64> {
        let ms = millis(now);
        let slot = &mut self.slots[at as usize];
        let quiet = ms.wrapping_sub(slot.last_line) < 1000;
        let interval = 1_000_000_000 / u64::from(LOG_LINES_PER_SECOND);
        let tolerance = interval * u64::from(LOG_LINES_PER_SECOND - 1);
        let full_at = self.lines_full_at.max(now);
        if quiet || full_at - now > tolerance {
            self.unlogged += 1;
            return None;
        }
        self.lines_full_at = full_at + interval;
        slot.last_line = ms;
        Some(std::mem::take(&mut self.unlogged))
    }

    /// The bytes the table takes now (see [`PerSource::memory`]).
    fn memory(&self) -> usize {
        std::mem::size_of::<Table>()
            + self.slots.capacity() * std::mem::size_of::<Slot>()
            + self.index.bytes()
    }
}

fn millis(nanos: u64) -> u32 {
    (nanos / 1_000_000) as u32
}

/// Per-source limits being enforced: the table of sources and the limits,
/// shared by the accept loops of one service (or one tunnel route).
pub struct PerSource {
    table: Mutex<Table>,
    stats: Arc<PerSourceStats>,
    epoch: tokio::time::Instant,
}

impl PerSource {
    /// A limiter for `settings`, counting in `stats`.
    pub fn new(settings: PerSourceSettings, stats: Arc<PerSourceStats>) -> Arc<PerSource> {
        Arc::new(PerSource {
            table: Mutex::new(Table {
                limits: Limits::new(settings),
                index: Index::new(),
                slots: Vec::new(),
                free: NONE,
                head: NONE,
                tail: NONE,
                lines_full_at: 0,
                unlogged: 0,
            }),
            stats,
            epoch: tokio::time::Instant::now(),
        })
    }

    /// The limiter a service with `settings` runs with after a reload:
    /// `current` with the new limits when it groups sources the same way
    /// (so open connections and spent buckets still count), a new one
    /// when the grouping changed, none when the limits are off.
    pub fn carry(
        current: Option<Arc<PerSource>>,
        settings: &PerSourceSettings,
        stats: &Arc<PerSourceStats>,
    ) -> Option<Arc<PerSource>> {
        if !settings.is_on() {
            return None;
        }
        if let Some(current) = current.filter(|c| Arc::ptr_eq(&c.stats, stats)) {
            let mut table = current.table();
            let old = &table.limits.settings;
            if (old.prefix_v4, old.prefix_v6) == (settings.prefix_v4, settings.prefix_v6) {
                table.limits = Limits::new(settings.clone());
                drop(table);
                return Some(current);
            }
        }
        Some(PerSource::new(settings.clone(), stats.clone()))
    }

    /// The limits in force.
    pub fn settings(&self) -> PerSourceSettings {
        self.table().limits.settings.clone()
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<PerSourceStats> {
        &self.stats
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // The table stays consistent at every step a panic could stop.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64
    }

    /// Lets a new connection from `ip` in, or refuses it. The permit
    /// counts the connection as open until it is dropped.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<SourcePermit, Refusal> {
        let now = self.now();
        let mut table = self.table();
        let table = &mut *table;
        table.sweep(now, 2, &self.stats);
        let (key, source) = table.limits.source(ip);
        let at = match table.index.find(&key, &table.slots) {
            Some(bucket) => {
                let at = table.index.buckets[bucket];
                if table.slots[at as usize].active == 0 {
                    table.unlink(at);
                }
                at
            }
            None => table.insert(key, now, &self.stats),
        };
        let slot = &mut table.slots[at as usize];
        let settings = &table.limits.settings;
        let limit = if let Some(max) = settings.max_connections.filter(|max| slot.active >= *max) {
            Some(Limit::Connections(max))
        } else if let Some((interval, tolerance)) = table.limits.rate {
            let full_at = slot.full_at.max(now);
            if full_at - now > tolerance {
                Some(Limit::Rate {
                    rate: settings.rate.unwrap_or(Rate::per_second(1)),
                    burst: settings.burst(),
                })
            } else {
                slot.full_at = full_at.saturating_add(interval);
                None
            }
        } else {
            None
        };
        let Some(limit) = limit else {
            slot.active += 1;
            return Ok(SourcePermit {
                limiter: self.clone(),
                slot: at,
            });
        };
        if slot.active == 0 {
            table.push_idle(at);
        }
        match limit {
            Limit::Connections(_) => &self.stats.refused_connections,
            Limit::Rate { .. } => &self.stats.refused_rate,
        }
        .fetch_add(1, Ordering::Relaxed);
        Err(Refusal {
            source,
            limit,
            log: table.log_verdict(at, now),
        })
    }

    /// Sources remembered now.
    pub fn sources(&self) -> usize {
        self.table().index.len
    }

    /// Connections open now from the source of `ip`.
    pub fn open(&self, ip: IpAddr) -> u32 {
        let table = self.table();
        let (key, _) = table.limits.source(ip);
        table.index.find(&key, &table.slots).map_or(0, |bucket| {
            table.slots[table.index.buckets[bucket] as usize].active
        })
    }

    /// The bytes the table takes now: its entries (40 bytes each, in a
    /// vector that grows to at most `max_sources`, plus one per open
    /// connection beyond them) and its index (4 bytes a bucket, a power of
    /// two at least twice the entries). For the default 50,000 sources
    /// that is at most 2,524,288 bytes and a few more, however many
    /// addresses connect (see the tests).
    pub fn memory(&self) -> usize {
        self.table().memory()
    }
}

impl fmt::Debug for PerSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let table = self.table();
        f.debug_struct("PerSource")
            .field("settings", &table.limits.settings)
            .field("sources", &table.index.len)
            .finish_non_exhaustive()
    }
}

impl Drop for PerSource {
    fn drop(&mut self) {
        let sources = self.table().index.len as u64;
        self.stats.sources.fetch_sub(sources, Ordering::Relaxed);
    }
}

/// One open connection's place under its source's limit, given back on
/// drop.
#[derive(Debug)]
pub struct SourcePermit {
    limiter: Arc<PerSource>,
    slot: u32,
}

impl Drop for SourcePermit {
    fn drop(&mut self) {
        let mut table = self.limiter.table();
        let slot = &mut table.slots[self.slot as usize];
        slot.active = slot.active.saturating_sub(1);
        if slot.active == 0 {
            table.push_idle(self.slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(yaml: &str) -> Result<PerSourceSettings, String> {
        crate::yaml::from_str(yaml)
    }

    fn limiter(yaml: &str) -> Arc<PerSource> {
        PerSource::new(settings(yaml).unwrap(), Arc::default())
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn rates_in_the_forms_people_write() {
        let rate = |s: &str| s.parse::<Rate>();
        assert_eq!(rate("10/s").unwrap(), Rate::per_second(10));
        assert_eq!(rate("10").unwrap(), Rate::per_second(10));
        assert_eq!(rate("10 / second").unwrap(), Rate::per_second(10));
        let per_minute = rate("600/min").unwrap();
        assert_eq!(per_minute.per, Duration::from_secs(60));
        assert_eq!(per_minute.to_string(), "600/min");
        assert_eq!(rate("5/10s").unwrap().per, Duration::from_secs(10));
        assert_eq!(rate("5/10s").unwrap().to_string(), "5/10s");
        assert_eq!(rate("100/h").unwrap().to_string(), "100/h");
        assert!(rate("0/s").unwrap_err().contains("refuse every connection"));
        assert!(rate("ten/s").unwrap_err().contains("10/s"));
        assert!(rate("10/fortnightly").unwrap_err().contains("not a period"));
        assert!(rate("10/0s").unwrap_err().contains("longer than 0"));
        assert!(rate("2000000/s").unwrap_err().contains("limits nothing"));
    }

    #[test]
    fn settings_are_checked_with_messages_that_say_what_to_do() {
        let s = settings("{max_connections: 5, rate: 50/s, burst: 10}").unwrap();
        assert_eq!(s.max_connections, Some(5));
        assert_eq!((s.prefix_v4, s.prefix_v6), (32, 64));
        assert_eq!(s.burst(), 10);
        assert!(s.is_on());
        assert_eq!(settings("{rate: 20/s}").unwrap().burst(), 20);
        assert!(!settings("{}").unwrap().is_on());
        assert!(!PerSourceSettings::default().is_on());
        for (yaml, says) in [
            ("{rate: 0/s}", "refuse every connection"),
            ("{rate: 10/s, burst: 0}", "burst must be at least 1"),
            ("{max_connections: 0}", "max_connections must be at least 1"),
            ("{burst: 5}", "no rate is set"),
            ("{rate: 1/s, prefix_v4: 33}", "write 1 to 32"),
            ("{rate: 1/s, prefix_v6: 0}", "write 1 to 128"),
            (
                "{rate: 1/s, max_sources: 0}",
                "max_sources 0 is out of range",
            ),
            ("{rate: fast}", "10/s"),
        ] {
            let e = settings(yaml).unwrap_err();
            assert!(e.contains(says), "{yaml}: {e}");
        }
        // Written back as it reads.
        let s = settings("{rate: 600/min, burst: 5, prefix_v6: 56}").unwrap();
        let back = settings(&crate::yaml::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[tokio::test]
    async fn a_source_holds_at_most_max_connections_at_once() {
        let limits = limiter("{max_connections: 3}");
        let a = ip("192.0.2.1");
        let held: Vec<SourcePermit> = (0..3).map(|_| limits.admit(a).unwrap()).collect();
        let refusal = limits.admit(a).unwrap_err();
        assert_eq!(refusal.limit, Limit::Connections(3));
        assert_eq!(refusal.source.to_string(), "192.0.2.1");
        assert!(refusal
            .to_string()
            .contains("192.0.2.1 has 3 connections open"));
        // Another address is another source.
        let other = limits.admit(ip("192.0.2.2")).unwrap();
        assert_eq!(limits.open(a), 3);
        drop(held);
        assert_eq!(limits.open(a), 0);
        let again: Vec<SourcePermit> = (0..3).map(|_| limits.admit(a).unwrap()).collect();
        assert!(limits.admit(a).is_err());
        assert_eq!(limits.stats().refused_connections(), 2);
        assert_eq!(limits.stats().refused_rate(), 0);
        drop((again, other));
    }

    #[tokio::test]
    async fn permits_dropped_on_other_threads_give_places_back() {
        let limits = limiter("{max_connections: 50}");
        let a = ip("198.51.100.7");
        let mut threads = Vec::new();
        for _ in 0..8 {
            let limits = limits.clone();
            threads.push(std::thread::spawn(move || {
                for _ in 0..1000 {
                    if let Ok(permit) = limits.admit(a) {
                        assert!(limits.open(a) <= 50);
                        drop(permit);
                    }
                }
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(limits.open(a), 0);
        assert_eq!(limits.sources(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_lets_a_burst_in_then_the_rate() {
        let limits = limiter("{rate: 10/s, burst: 5}");
        let a = ip("203.0.113.9");
        // A burst of five at once, then nothing.
        for _ in 0..5 {
            drop(limits.admit(a).unwrap());
        }
        let refusal = limits.admit(a).unwrap_err();
        assert!(matches!(refusal.limit, Limit::Rate { burst: 5, .. }));
        assert!(refusal
            .to_string()
            .contains("opens connections faster than 10/s (burst 5)"));
        // One token every 100 ms.
        tokio::time::advance(Duration::from_millis(99)).await;
        assert!(limits.admit(a).is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        drop(limits.admit(a).unwrap());
        assert!(limits.admit(a).is_err());
        // Over ten seconds at 50 tries a second: ten a second get in.
        let mut admitted = 0;
        for _ in 0..500 {
            tokio::time::advance(Duration::from_millis(20)).await;
            admitted += usize::from(limits.admit(a).is_ok());
        }
        assert_eq!(admitted, 100);
        // A second idle refills the bucket, but no more than the burst.
        tokio::time::advance(Duration::from_secs(60)).await;
        let burst = (0..20).filter(|_| limits.admit(a).is_ok()).count();
        assert_eq!(burst, 5);
    }

    #[tokio::test]
    async fn a_prefix_is_one_source() {
        let limits = limiter("{max_connections: 2, prefix_v4: 24, prefix_v6: 48}");
        let (_a, _b) = (
            limits.admit(ip("10.1.2.3")).unwrap(),
            limits.admit(ip("10.1.2.200")).unwrap(),
        );
        let refusal = limits.admit(ip("10.1.2.77")).unwrap_err();
        assert_eq!(refusal.source.to_string(), "10.1.2.0/24");
        let _c = limits.admit(ip("10.1.3.1")).unwrap();
        // An IPv4 client of a dual-stack listener is the same source.
        assert!(limits.admit(ip("::ffff:10.1.2.9")).is_err());

        let (_d, _e) = (
            limits.admit(ip("2001:db8:1:aaaa::1")).unwrap(),
            limits.admit(ip("2001:db8:1:bbbb::2")).unwrap(),
        );
        let refusal = limits.admit(ip("2001:db8:1:cccc::3")).unwrap_err();
        assert_eq!(refusal.source.to_string(), "2001:db8:1::/48");
        let _f = limits.admit(ip("2001:db8:2::1")).unwrap();
        assert_eq!(limits.sources(), 4);

        // At full length each address is its own source.
        let each = limiter("{max_connections: 1, prefix_v6: 128}");
        let _g = each.admit(ip("2001:db8::1")).unwrap();
        let _h = each.admit(ip("2001:db8::2")).unwrap();
        let refusal = each.admit(ip("2001:db8::1")).unwrap_err();
        assert_eq!(refusal.source.to_string(), "2001:db8::1");
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_logged_sparingly() {
        let limits = limiter("{max_connections: 1}");
        let _held: Vec<SourcePermit> = (1..=50u8)
            .map(|n| limits.admit(IpAddr::from([192, 0, 2, n])).unwrap())
            .collect();
        // One source, hammering: its first refusal is logged, then one a
        // second, each saying how many went unlogged.
        let a = IpAddr::from([192, 0, 2, 1]);
        let first = limits.admit(a).unwrap_err();
        assert_eq!(first.log, Some(0));
        assert!(first
            .to_string()
            .contains("192.0.2.1 has 1 connection open"));
        let quiet = (0..99).filter(|_| limits.admit(a).unwrap_err().log.is_some());
        assert_eq!(quiet.count(), 0);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(limits.admit(a).unwrap_err().log, Some(99));
        // Many sources at once: at most LOG_LINES_PER_SECOND lines.
        tokio::time::advance(Duration::from_secs(1)).await;
        let lines = (1..=50u8)
            .filter(|n| {
                limits
                    .admit(IpAddr::from([192, 0, 2, *n]))
                    .unwrap_err()
                    .log
                    .is_some()
            })
            .count();
        assert_eq!(lines, LOG_LINES_PER_SECOND as usize);
        assert_eq!(limits.stats().refused_connections(), 151);
    }

    #[tokio::test(start_paused = true)]
    async fn a_million_addresses_take_bounded_memory() {
        let limits = limiter("{rate: 5/s}");
        let mut largest = 0;
        // A spread of addresses, as a flood of forged sources would come
        // (the clock stands still: every bucket has something to remember).
        for n in 0..1_000_000u32 {
            let addr = IpAddr::from((n.wrapping_mul(2_654_435_761)).to_be_bytes());
            drop(limits.admit(addr).unwrap());
            if n % 25_000 == 0 {
                largest = largest.max(limits.memory());
                assert!(limits.sources() <= DEFAULT_MAX_SOURCES);
            }
        }
        assert_eq!(limits.sources(), DEFAULT_MAX_SOURCES);
        assert_eq!(limits.stats().sources(), DEFAULT_MAX_SOURCES as u64);
        largest = largest.max(limits.memory());
        // 50,000 entries of 40 bytes and 131,072 buckets of 4 bytes:
        // 2,524,288 bytes and the table's own few, whatever the flood.
        assert_eq!(std::mem::size_of::<Slot>(), 40);
        let fixed = std::mem::size_of::<Table>();
        assert!(fixed < 200, "{fixed}");
        assert_eq!(largest, 50_000 * 40 + 131_072 * 4 + fixed);
        // Every address flooded in was new, and let in.
        assert_eq!(limits.stats().refused_rate(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn max_sources_sets_the_bound() {
        let limits = limiter("{rate: 1/s, max_sources: 20000}");
        for n in 0..200_000u32 {
            drop(limits.admit(IpAddr::from((n.wrapping_mul(2_654_435_761)).to_be_bytes())));
        }
        let fixed = std::mem::size_of::<Table>();
        assert_eq!(limits.sources(), 20_000);
        // 1,062,144 bytes.
        assert_eq!(limits.memory(), 20_000 * 40 + 65_536 * 4 + fixed);
    }

    #[tokio::test]
    async fn sources_with_open_connections_are_never_evicted() {
        let limits = limiter("{max_connections: 1, max_sources: 100}");
        let held: Vec<SourcePermit> = (0..100u32)
            .map(|n| {
                limits
                    .admit(IpAddr::from((0x0a00_0000 + n).to_be_bytes()))
                    .unwrap()
            })
            .collect();
        // The table is full of open connections: a new source is let in
        // beside them, and none of them loses its count.
        let extra = limits.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(limits.sources(), 101);
        assert!(limits.admit(ip("10.0.0.5")).is_err());
        drop(held);
        drop(extra);
        // Idle now: new sources take their places, the table back in bound.
        for n in 0..500u32 {
            drop(
                limits
                    .admit(IpAddr::from((0xc000_0000 + n).to_be_bytes()))
                    .unwrap(),
            );
        }
        assert!(limits.sources() <= 100, "{}", limits.sources());
    }

    #[tokio::test]
    async fn the_table_agrees_with_a_plain_count_through_churn() {
        // A small table, many sources, connections opening and closing in
        // a pseudo-random order: every source's count stays exact (open
        // entries are never evicted; idle ones hold nothing else here).
        let limits = limiter("{max_connections: 3, max_sources: 64}");
        let mut model: std::collections::HashMap<IpAddr, u32> = Default::default();
        let mut held: Vec<(IpAddr, SourcePermit)> = Vec::new();
        let mut peak = 0;
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut random = move |below: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % below as u64) as usize
        };
        for _ in 0..50_000 {
            if held.is_empty() || random(3) > 0 {
                let ip = IpAddr::from([10, 0, (random(2)) as u8, random(100) as u8]);
                let open = model.entry(ip).or_default();
                match limits.admit(ip) {
                    Ok(permit) => {
                        assert!(*open < 3, "{ip} let in with {open} open");
                        *open += 1;
                        held.push((ip, permit));
                    }
                    Err(refusal) => {
                        assert_eq!(*open, 3, "{ip} refused with {open} open: {refusal}")
                    }
                }
            } else {
                let (ip, permit) = held.swap_remove(random(held.len()));
                drop(permit);
                *model.get_mut(&ip).unwrap() -= 1;
            }
            let ip = IpAddr::from([10, 0, (random(2)) as u8, random(100) as u8]);
            assert_eq!(limits.open(ip), model.get(&ip).copied().unwrap_or(0));
            // Over the bound only while every entry has a connection open.
            let busy = model.values().filter(|n| **n > 0).count();
            peak = peak.max(busy);
            assert!(limits.sources() <= 64.max(peak + 1), "{}", limits.sources());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sources_with_nothing_to_remember_are_dropped() {
        let limits = limiter("{rate: 10/s}");
        for n in 0..100u8 {
            drop(limits.admit(IpAddr::from([192, 0, 2, n])).unwrap());
        }
        assert_eq!(limits.sources(), 100);
        // Their buckets refill in 100 ms; each new client sweeps two.
        tokio::time::advance(Duration::from_secs(2)).await;
        for _ in 0..60 {
            drop(limits.admit(ip("198.51.100.1")).unwrap());
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        assert_eq!(limits.sources(), 1);
        assert_eq!(limits.stats().sources(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_the_counts_unless_the_grouping_changes() {
        let stats = Arc::new(PerSourceStats::default());
        let first = settings("{max_connections: 2}").unwrap();
        let limits = PerSource::carry(None, &first, &stats).unwrap();
        let a = ip("192.0.2.1");
        let _held = (limits.admit(a).unwrap(), limits.admit(a).unwrap());
        // A higher limit: the same table, the two still count.
        let more = settings("{max_connections: 3}").unwrap();
        let same = PerSource::carry(Some(limits.clone()), &more, &stats).unwrap();
        assert!(Arc::ptr_eq(&same, &limits));
        let _third = same.admit(a).unwrap();
        assert!(same.admit(a).is_err());
        // Another grouping starts afresh; off is none.
        let wider = settings("{max_connections: 3, prefix_v4: 24}").unwrap();
        let fresh = PerSource::carry(Some(same.clone()), &wider, &stats).unwrap();
        assert!(!Arc::ptr_eq(&fresh, &same));
        assert_eq!(fresh.open(a), 0);
        assert!(PerSource::carry(Some(fresh), &PerSourceSettings::default(), &stats).is_none());
        // The counters go on across all of them.
        assert_eq!(stats.refused_connections(), 1);
    }
}
