//! corral: a caching reverse proxy and load balancer for Linux, one pinned
//! io_uring executor (glommio) per CPU.
//!
//! Architecture (see `../shared/design/ARCHITECTURE.md`): every shard owns its
//! listener (SO_REUSEPORT), its connections and its upstream pools, with no
//! locks on the request path. The modules split into pure cores and thin I/O:
//!
//! - [`http`] (pure): request/response heads, chunked framing, rewriting.
//! - [`config`] (pure): TOML and flags into a validated [`config::Config`].
//! - [`balance`] (pure): backend selection: round robin, random, two
//!   choices, consistent hashing, peak-EWMA, retry budgets.
//! - [`health`]: the backend health state machine (pure) and the owner
//!   task that probes and publishes health (I/O).
//! - [`cache`] (pure cores): RFC 9111 policy, S3-FIFO store, collapse table.
//! - [`origin`] (I/O): upstream connection pools.
//! - [`admin`]: per-shard statistics merged on demand, the admin listener
//!   (`/metrics`, `/status`, the status page), the access log.
//! - [`shard`] (I/O): executors, listeners, the connection driver and the
//!   socket fast path.

pub mod admin;
pub mod balance;
pub mod cache;
pub mod config;
pub mod demo;
pub mod health;
pub mod http;
pub mod origin;
pub mod shard;
