//! End-to-end tests live in `tests/tests/`: they run the workspace's real
//! binaries against real peers (the `telnet` client, PostgreSQL, the square
//! client). This library holds the helpers they share.
