//! `[cluster] redis`: rate limits shared by every node, counted in Redis/Valkey.
//!
//! One GCRA bucket per (limit, key). All the limits a command counts go to
//! Redis in one script call that reads every bucket first and writes only
//! when none of the `tempfail` limits refuses, so a denial on one key spends
//! nothing on the others. The script takes the time from the Redis server
//! (`TIME`), never from a node, and every key it writes carries its expiry
//! in the same `SET … PX` (the moment its bucket is full again), so no key
//! ever lives without a TTL. The key names carry a hash of the limit's
//! definition: a changed limit starts with fresh buckets.
//!
//! Each call has [`DEADLINE`]; a call that fails or runs out of it is a
//! backend error (`postern_ratelimit_backend_errors_total`), and
//! `on_backend_error` decides: this node's own governor buckets at the limit
//! divided by `[cluster] nodes`, or `451 4.4.3`.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{IntCounter, IntGauge};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::{BackendOnError, ClusterConfig};
use crate::policy::limits::LimitSpec;

/// How long one call to Redis may take before the node decides without it:
/// an SMTP client waits for this at most, once per MAIL or RCPT.
pub(crate) const DEADLINE: Duration = Duration::from_millis(250);

/// How often the idle node asks Redis whether it is there (the gauge moves
/// even when no mail comes).
pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The GCRA of every bucket of one command, all or none.
///
/// KEYS: one per bucket. ARGV[1]: the server time (µs) after which the
/// caller has given up waiting (0: unknown), so a call that sat in a queue
/// while Redis was stopped spends nothing. Then per bucket: the emission
/// interval (µs), the burst tolerance (µs) and `t` (a tempfail limit) or `h`
/// (a hold limit). Returns {code, value, now}: code 0 = allowed, value = the
/// first held bucket (1-based) or 0; code i > 0 = bucket i refused, value =
/// µs until it would pass; code -1 = stale.
const GCRA: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local stale = tonumber(ARGV[1])
if stale > 0 and now > stale then return {-1, 0, now} end
local next_tat = {}
local held = 0
for i = 1, #KEYS do
  local a = 2 + (i - 1) * 3
  local period = tonumber(ARGV[a])
  local tolerance = tonumber(ARGV[a + 1])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  local new_tat = tat + period
  local allow_at = new_tat - tolerance
  if now < allow_at then
    if ARGV[a + 2] == 't' then return {i, allow_at - now, now} end
    if held == 0 then held = i end
  else
    next_tat[i] = new_tat
  end
end
for i = 1, #KEYS do
  local n = next_tat[i]
  if n then
    local ttl = math.ceil((n - now) / 1000)
    if ttl < 1 then ttl = 1 end
    redis.call('SET', KEYS[i], string.format('%d', n), 'PX', ttl)
  end
end
return {0, held, now}
";

/// One bucket of a command: the full Redis key and its limit's GCRA terms.
pub(crate) struct Bucket {
    pub(crate) key: String,
    pub(crate) period_us: u64,
    pub(crate) tolerance_us: u64,
    pub(crate) hold: bool,
}

/// What Redis said of one command's buckets (indices into the buckets given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Every bucket was counted except over-limit `hold` ones; the first of those.
    Allowed { held: Option<usize> },
    /// This `tempfail` bucket is over its limit; nothing was counted.
    Refused { bucket: usize, wait: Duration },
}

/// Redis failed or missed [`DEADLINE`] (counted and logged already).
#[derive(Debug)]
pub(crate) struct Unavailable;

/// Checks a `[cluster] redis` URL without connecting.
pub(crate) fn parse_redis_url(url: &str) -> Result<redis::Client, String> {
    let url = url.trim();
    if !(url.starts_with("redis://") || url.starts_with("redis+unix://")) {
        return Err(format!(
            "\"{url}\" is not a redis:// URL (write e.g. \"redis://127.0.0.1:6379\")"
        ));
    }
    redis::Client::open(url).map_err(|e| format!("\"{url}\": {e}"))
}

/// The prefix of every Redis key of `spec`'s buckets: `postern:rl:<hash>:`,
/// the hash over what the limit counts (name, key kind, rate, burst).
pub(crate) fn key_prefix(spec: &LimitSpec) -> String {
    let definition = format!(
        "{}\0{:?}\0{}\0{}\0{}",
        spec.name,
        spec.key,
        spec.count,
        spec.per.as_nanos(),
        spec.burst
    );
    let digest = ring::digest::digest(&ring::digest::SHA256, definition.as_bytes());
    let hex: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("postern:rl:{hex}:")
}

/// The GCRA terms of `spec`: (emission interval, burst tolerance) in µs.
pub(crate) fn gcra_terms(spec: &LimitSpec) -> (u64, u64) {
    let per = u64::try_from(spec.per.as_micros()).unwrap_or(u64::MAX);
    let period = (per / u64::from(spec.count.max(1))).max(1);
    (period, period.saturating_mul(u64::from(spec.burst)))
}

/// A node's link to the shared limits: one multiplexed connection that
/// reconnects by itself, made on first use (inside the runtime).
pub(crate) struct Shared {
    client: redis::Client,
    manager: OnceLock<ConnectionManager>,
    script: redis::Script,
    pub(crate) on_error: BackendOnError,
    node: String,
    up: IntGauge,
    errors: IntCounter,
    /// Whether the last call answered (to log the changes only).
    answering: AtomicBool,
    /// Redis's clock minus ours (µs), from the last answer; `i64::MIN` = unknown.
    offset_us: AtomicI64,
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Shared {
    /// The link `cluster` names, or None for a single node.
    pub(crate) fn from_config(
        cluster: &ClusterConfig,
        up: IntGauge,
        errors: IntCounter,
    ) -> Option<Arc<Shared>> {
        let client = parse_redis_url(&cluster.redis).ok()?;
        // Down until Redis first answers.
        up.set(0);
        Some(Arc::new(Shared {
            client,
            manager: OnceLock::new(),
            script: redis::Script::new(GCRA),
            on_error: cluster.on_backend_error,
            node: cluster.node.clone(),
            up,
            errors,
            answering: AtomicBool::new(false),
            offset_us: AtomicI64::new(i64::MIN),
        }))
    }

    fn manager(&self) -> redis::RedisResult<ConnectionManager> {
        if let Some(m) = self.manager.get() {
            return Ok(m.clone());
        }
        // Our own deadline bounds every call; the manager only has to keep
        // trying to reconnect, quickly.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(DEADLINE))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let m = ConnectionManager::new_lazy_with_config(self.client.clone(), config)?;
        Ok(self.manager.get_or_init(|| m).clone())
    }

    /// Counts `buckets` in Redis, all or none, within [`DEADLINE`].
    pub(crate) async fn check(&self, buckets: &[Bucket]) -> Result<Answer, Unavailable> {
        let offset = self.offset_us.load(Ordering::Relaxed);
        let sent = now_us();
        let deadline_us = i64::try_from(DEADLINE.as_micros()).unwrap_or(i64::MAX);
        let stale_after = if offset == i64::MIN {
            0
        } else {
            sent.saturating_add(offset).saturating_add(deadline_us)
        };
        let call = async {
            let mut con = self.manager()?;
            let mut inv = self.script.prepare_invoke();
            for b in buckets {
                inv.key(&b.key);
            }
            inv.arg(stale_after);
            for b in buckets {
                inv.arg(b.period_us)
                    .arg(b.tolerance_us)
                    .arg(if b.hold { "h" } else { "t" });
            }
            inv.invoke_async::<(i64, i64, i64)>(&mut con).await
        };
        let (code, value, server_now) = match tokio::time::timeout(DEADLINE, call).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(self.failed(&e.to_string())),
            Err(_) => return Err(self.failed("no answer within the deadline")),
        };
        self.offset_us
            .store(server_now.saturating_sub(sent), Ordering::Relaxed);
        let index = |i: i64| usize::try_from(i - 1).ok().filter(|&i| i < buckets.len());
        let answer = match code {
            0 => Answer::Allowed { held: index(value) },
            c if c > 0 => match index(c) {
                Some(bucket) => Answer::Refused {
                    bucket,
                    wait: Duration::from_micros(u64::try_from(value).unwrap_or(0)),
                },
                None => return Err(self.failed("the script named no such bucket")),
            },
            _ => return Err(self.failed("the call reached Redis after its deadline")),
        };
        self.answered();
        Ok(answer)
    }

    /// `PING` within [`DEADLINE`]: moves the gauge while no mail comes.
    pub(crate) async fn probe(&self) -> bool {
        let call = async {
            let mut con = self.manager()?;
            redis::cmd("PING").query_async::<String>(&mut con).await
        };
        match tokio::time::timeout(DEADLINE, call).await {
            Ok(Ok(_)) => {
                self.answered();
                true
            }
            Ok(Err(e)) => {
                self.failed(&e.to_string());
                false
            }
            Err(_) => {
                self.failed("no answer within the deadline");
                false
            }
        }
    }

    fn answered(&self) {
        self.up.set(1);
        if !self.answering.swap(true, Ordering::Relaxed) {
            tracing::info!(node = %self.node, "rate-limit backend (Redis) answers: limits are shared");
        }
    }

    fn failed(&self, why: &str) -> Unavailable {
        self.errors.inc();
        self.up.set(0);
        if self.answering.swap(false, Ordering::Relaxed) {
            let fallback = match self.on_error {
                BackendOnError::Local => "counting locally at limit / nodes",
                BackendOnError::Tempfail => "answering 451 4.4.3",
            };
            tracing::warn!(node = %self.node, error = why, "rate-limit backend (Redis) failed: {fallback}");
        } else {
            tracing::debug!(node = %self.node, error = why, "rate-limit backend (Redis) call failed");
        }
        Unavailable
    }
}

/// Asks Redis once whether it is there, for `postern check`: Ok with a line
/// to print, or why not. None when `[cluster] redis` is not set.
pub async fn check_reachable(cfg: &crate::config::Config) -> Option<Result<String, String>> {
    let cluster = &cfg.cluster;
    if cluster.redis.trim().is_empty() {
        return None;
    }
    let client = match parse_redis_url(&cluster.redis) {
        Ok(c) => c,
        Err(e) => return Some(Err(e)),
    };
    let wait = Duration::from_secs(2);
    let call = async {
        let mut con = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut con).await
    };
    Some(match tokio::time::timeout(wait, call).await {
        Ok(Ok(_)) => Ok(format!(
            "[cluster] redis {} answers (rate limits shared by node {})",
            cluster.redis, cluster.node
        )),
        Ok(Err(e)) => Err(format!("[cluster] redis {}: {e}", cluster.redis)),
        Err(_) => Err(format!(
            "[cluster] redis {}: no answer within {}s",
            cluster.redis,
            wait.as_secs()
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::limits::{LimitAction, LimitKey, Scope};

    fn spec(name: &str, count: u32) -> LimitSpec {
        LimitSpec {
            name: name.into(),
            key: LimitKey::Sender,
            count,
            per: Duration::from_secs(60),
            burst: count,
            scope: Scope::Inbound,
            action: LimitAction::Tempfail,
        }
    }

    #[test]
    fn a_changed_limit_gets_other_keys() {
        let a = key_prefix(&spec("s", 10));
        assert_eq!(a, key_prefix(&spec("s", 10)));
        assert_ne!(a, key_prefix(&spec("s", 11)));
        assert_ne!(a, key_prefix(&spec("t", 10)));
        assert!(a.starts_with("postern:rl:") && a.ends_with(':'), "{a}");
    }

    #[test]
    fn gcra_terms_of_ten_a_minute() {
        assert_eq!(gcra_terms(&spec("s", 10)), (6_000_000, 60_000_000));
    }

    #[test]
    fn only_redis_urls() {
        assert!(parse_redis_url("redis://127.0.0.1:6379").is_ok());
        assert!(parse_redis_url("127.0.0.1:6379").is_err());
        assert!(parse_redis_url("http://127.0.0.1:6379").is_err());
    }
}
