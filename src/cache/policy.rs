//! RFC 9111 rules for a shared cache: what may be stored (§3), how long it is
//! fresh (§4.2), its age (§4.2.3), and what a request's own directives allow
//! (§5.2.1). Pure: times are seconds since the Unix epoch, passed in.

/// Parsed `Cache-Control` directives (RFC 9111 §5.2), request or response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
    pub only_if_cached: bool,
    /// `max-stale` with no value accepts any staleness: `Some(u64::MAX)`.
    pub max_stale: Option<u64>,
    pub min_fresh: Option<u64>,
}

/// Delta-seconds beyond this are taken as this (RFC 9111 §1.2.2).
const MAX_DELTA: u64 = 1 << 31;

pub fn delta_seconds(v: &[u8]) -> Option<u64> {
    let v = v
        .strip_prefix(b"\"")
        .and_then(|v| v.strip_suffix(b"\""))
        .unwrap_or(v);
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut n: u64 = 0;
    for &d in v {
        n = n.saturating_mul(10).saturating_add(u64::from(d - b'0'));
    }
    Some(n.min(MAX_DELTA))
}

impl CacheControl {
    /// Parses every `Cache-Control` field value of a message. An invalid
    /// `max-age` or `s-maxage` value counts as 0, so the response is stale
    /// rather than fresh for an unknown time.
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> CacheControl {
        let mut cc = CacheControl::default();
        for value in values {
            for d in split_directives(value) {
                let (name, arg) = match memchr::memchr(b'=', d) {
                    Some(i) => (
                        crate::http::trim_ows(&d[..i]),
                        Some(crate::http::trim_ows(&d[i + 1..])),
                    ),
                    None => (d, None),
                };
                let num = || arg.and_then(delta_seconds);
                let lower = name.to_ascii_lowercase();
                match lower.as_slice() {
                    // A repeated directive: the first one counts (§4.2.1).
                    b"max-age" if cc.max_age.is_none() => cc.max_age = Some(num().unwrap_or(0)),
                    b"s-maxage" if cc.s_maxage.is_none() => cc.s_maxage = Some(num().unwrap_or(0)),
                    b"no-store" => cc.no_store = true,
                    // The field-list forms (`no-cache="Set-Cookie"`) are
                    // treated as the unqualified directive: stricter, and
                    // RFC 9111 §5.2.2.4 allows it.
                    b"no-cache" => cc.no_cache = true,
                    b"private" => cc.private = true,
                    b"public" => cc.public = true,
                    b"must-revalidate" => cc.must_revalidate = true,
                    b"proxy-revalidate" => cc.proxy_revalidate = true,
                    b"stale-while-revalidate" => cc.stale_while_revalidate = num(),
                    b"stale-if-error" => cc.stale_if_error = num(),
                    b"only-if-cached" => cc.only_if_cached = true,
                    b"max-stale" => {
                        cc.max_stale = Some(arg.map_or(u64::MAX, |a| delta_seconds(a).unwrap_or(0)))
                    }
                    b"min-fresh" => cc.min_fresh = num(),
                    _ => {}
                }
            }
        }
        cc
    }
}

/// Splits a Cache-Control value on commas outside quoted strings.
fn split_directives(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, &b) in v.iter().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            quoted = !quoted;
        } else if b == b',' && !quoted {
            parts.push(&v[start..i]);
            start = i + 1;
        }
    }
    parts.push(&v[start..]);
    parts
        .into_iter()
        .map(crate::http::trim_ows)
        .filter(|p| !p.is_empty())
}

/// Statuses a cache may store with heuristic freshness (RFC 9110 §15.1).
pub fn cacheable_by_default(status: u16) -> bool {
    matches!(
        status,
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// What the storage and freshness rules need to know of a request.
#[derive(Debug, Clone, Default)]
pub struct RequestFacts {
    /// GET (HEAD is answered from a stored GET, never stored itself).
    pub is_get: bool,
    pub has_authorization: bool,
    pub cc: CacheControl,
    /// `Pragma: no-cache` without `Cache-Control` (RFC 9111 §5.4).
    pub pragma_no_cache: bool,
}

/// What the storage and freshness rules need to know of a response.
#[derive(Debug, Clone, Default)]
pub struct ResponseFacts {
    pub status: u16,
    pub cc: CacheControl,
    pub expires: Option<i64>,
    /// `Expires` was present but not a valid date: already expired.
    pub expires_invalid: bool,
    pub date: Option<i64>,
    pub age: Option<u64>,
    pub last_modified: Option<i64>,
    pub has_etag: bool,
    pub has_set_cookie: bool,
    /// `Vary: *`.
    pub vary_star: bool,
}

/// Why a response is not stored, for `Cache-Status` and logs.
pub type NotStored = &'static str;

/// RFC 9111 §3: may a shared cache store this response to this request?
pub fn storable(req: &RequestFacts, resp: &ResponseFacts) -> Result<(), NotStored> {
    if !req.is_get {
        return Err("method");
    }
    if (100..200).contains(&resp.status) || resp.status == 206 || resp.status == 304 {
        return Err("status");
    }
    if req.cc.no_store || resp.cc.no_store {
        return Err("no-store");
    }
    if resp.cc.private {
        return Err("private");
    }
    if resp.vary_star {
        return Err("vary-star");
    }
    // §3.5: a request with Authorization only with an explicit permission.
    if req.has_authorization
        && !(resp.cc.public || resp.cc.must_revalidate || resp.cc.s_maxage.is_some())
    {
        return Err("authorization");
    }
    // A documented choice: responses setting cookies are per-user unless the
    // origin marks them public.
    if resp.has_set_cookie && !resp.cc.public {
        return Err("set-cookie");
    }
    let explicit = resp.cc.max_age.is_some()
        || resp.cc.s_maxage.is_some()
        || resp.expires.is_some()
        || resp.expires_invalid;
    // §3: `no-cache` is not among what makes a response storable.
    if explicit || resp.cc.public || cacheable_by_default(resp.status) {
        Ok(())
    } else {
        Err("not-cacheable-status")
    }
}

/// The longest heuristic lifetime (RFC 9111 §4.2.2 leaves the bound to us).
pub const MAX_HEURISTIC_SECS: u64 = 24 * 3600;

/// RFC 9111 §4.2.1 (shared cache): the freshness lifetime in seconds.
pub fn freshness_lifetime(resp: &ResponseFacts, response_time: i64) -> u64 {
    if let Some(s) = resp.cc.s_maxage {
        return s;
    }
    if let Some(m) = resp.cc.max_age {
        return m;
    }
    if resp.expires_invalid {
        return 0;
    }
    if let Some(e) = resp.expires {
        let date = resp.date.unwrap_or(response_time);
        return (e - date).max(0) as u64;
    }
    // §4.2.2: 10% of the time since Last-Modified, for statuses cacheable by
    // default or marked public.
    if let Some(lm) = resp.last_modified {
        if cacheable_by_default(resp.status) || resp.cc.public {
            let date = resp.date.unwrap_or(response_time);
            return (((date - lm).max(0) as u64) / 10).min(MAX_HEURISTIC_SECS);
        }
    }
    0
}

/// When a stored response was obtained, for its age (RFC 9111 §4.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub request_time: i64,
    pub response_time: i64,
    /// `corrected_initial_age`.
    pub initial_age: u64,
}

impl Timing {
    pub fn new(resp: &ResponseFacts, request_time: i64, response_time: i64) -> Timing {
        let apparent_age = resp.date.map_or(0, |d| (response_time - d).max(0) as u64);
        let response_delay = (response_time - request_time).max(0) as u64;
        let corrected_age_value = resp.age.unwrap_or(0) + response_delay;
        Timing {
            request_time,
            response_time,
            initial_age: apparent_age.max(corrected_age_value),
        }
    }

    /// `current_age` at `now`.
    pub fn current_age(&self, now: i64) -> u64 {
        self.initial_age + (now - self.response_time).max(0) as u64
    }
}

/// Whether a response arrived too old to be reused at all: its age as it
/// left the upstream (`Age`, or the apparent age from its `Date`) is past
/// its freshness lifetime and any stale-while-revalidate window (RFC 9111
/// §4.2.3). The response delay, which `Timing::initial_age` also counts,
/// is left out here: the requests waiting for this fetch waited it too,
/// and counting it in whole seconds would make a `max-age=1` response
/// stale or not by where a second boundary fell. So is one second of the
/// apparent age (a `Date` is in whole seconds).
pub fn stale_on_arrival(resp: &ResponseFacts, lifetime: u64, response_time: i64) -> bool {
    let apparent_age = resp.date.map_or(0, |d| (response_time - d).max(0) as u64);
    let age = resp.age.unwrap_or(0).max(apparent_age.saturating_sub(1));
    let window = resp.cc.stale_while_revalidate.map_or(0, |w| w.max(1));
    lifetime.saturating_add(window) <= age
}

/// What to do with a stored response for a request (RFC 9111 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Serve it.
    Fresh,
    /// Serve it stale and refresh in the background (stale-while-revalidate,
    /// or the request's max-stale).
    StaleOk,
    /// Validate with the origin first; serve it only on 304.
    Revalidate,
}

/// Decides how a stored response (`lifetime`, `age`, its directives) may
/// answer a request.
pub fn usable(resp_cc: &CacheControl, lifetime: u64, age: u64, req: &RequestFacts) -> Use {
    if req.cc.no_cache || req.pragma_no_cache || resp_cc.no_cache {
        return Use::Revalidate;
    }
    let fresh = lifetime > age;
    let remaining = lifetime.saturating_sub(age);
    // Request freshness limits (§5.2.1.1, §5.2.1.3).
    let req_ok =
        req.cc.max_age.is_none_or(|m| age <= m) && req.cc.min_fresh.is_none_or(|m| remaining >= m);
    if fresh && req_ok {
        return Use::Fresh;
    }
    // must-revalidate, proxy-revalidate and s-maxage forbid serving stale
    // (§5.2.2.2, §5.2.2.8, §5.2.2.10).
    let strict = resp_cc.must_revalidate || resp_cc.proxy_revalidate || resp_cc.s_maxage.is_some();
    if strict || !req_ok && fresh {
        return Use::Revalidate;
    }
    let staleness = age - lifetime.min(age);
    // A stale answer still keeps to the request's own limits: no older than
    // its max-age, and none at all when it wants some freshness left.
    let stale_allowed = req.cc.max_age.is_none_or(|m| age <= m) && req.cc.min_fresh.is_none();
    if let Some(ms) = req.cc.max_stale {
        if staleness <= ms && stale_allowed {
            return Use::StaleOk;
        }
    }
    if let Some(swr) = resp_cc.stale_while_revalidate {
        if staleness <= swr && req.cc.max_age.is_none() && req.cc.min_fresh.is_none() {
            return Use::StaleOk;
        }
    }
    Use::Revalidate
}

/// Whether a stale stored response may answer in place of an origin error
/// (RFC 5861 §4, stale-if-error, from the response or the request).
pub fn stale_if_error_ok(
    resp_cc: &CacheControl,
    req_cc: &CacheControl,
    lifetime: u64,
    age: u64,
) -> bool {
    // As for any stale answer (§4.2.4), no-cache forbids it too.
    if resp_cc.must_revalidate
        || resp_cc.proxy_revalidate
        || resp_cc.s_maxage.is_some()
        || resp_cc.no_cache
    {
        return false;
    }
    let staleness = age.saturating_sub(lifetime);
    let window = req_cc.stale_if_error.or(resp_cc.stale_if_error);
    window.is_some_and(|w| staleness <= w)
}

// ---- HTTP dates (RFC 9110 §5.6.7) ------------------------------------------

const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];
const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn num(s: &[u8]) -> Option<u32> {
    if s.is_empty() || s.len() > 4 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

fn hms(s: &[u8]) -> Option<i64> {
    let mut it = s.split(|&b| b == b':');
    let (h, m, sec) = (num(it.next()?)?, num(it.next()?)?, num(it.next()?)?);
    if it.next().is_some() || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    Some(i64::from(h * 3600 + m * 60 + sec))
}

fn month(s: &[u8]) -> Option<u32> {
    MONTHS
        .iter()
        .position(|m| m.eq_ignore_ascii_case(s))
        .map(|i| i as u32 + 1)
}

/// Parses an HTTP date in IMF-fixdate, RFC 850 or asctime form.
pub fn parse_http_date(v: &[u8]) -> Option<i64> {
    let v = crate::http::trim_ows(v);
    let words: Vec<&[u8]> = v.split(|&b| b == b' ').filter(|w| !w.is_empty()).collect();
    let (y, m, d, t) = match words.as_slice() {
        // Sun, 06 Nov 1994 08:49:37 GMT
        [_, d, mo, y, t, gmt] if gmt.eq_ignore_ascii_case(b"GMT") => {
            (i64::from(num(y)?), month(mo)?, num(d)?, hms(t)?)
        }
        // Sunday, 06-Nov-94 08:49:37 GMT
        [_, dmy, t, gmt] if gmt.eq_ignore_ascii_case(b"GMT") => {
            let mut p = dmy.split(|&b| b == b'-');
            let (d, mo, y) = (num(p.next()?)?, month(p.next()?)?, num(p.next()?)?);
            let y = i64::from(y);
            let y = if y < 70 {
                2000 + y
            } else if y < 100 {
                1900 + y
            } else {
                y
            };
            (y, mo, d, hms(t)?)
        }
        // Sun Nov  6 08:49:37 1994
        [_, mo, d, t, y] => (i64::from(num(y)?), month(mo)?, num(d)?, hms(t)?),
        _ => return None,
    };
    if !(1..=31).contains(&d) || y < 1970 {
        return None;
    }
    Some(days_from_civil(y, m, d) * 86_400 + t)
}

/// Formats seconds since the epoch as an IMF-fixdate.
pub fn format_http_date(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[days.rem_euclid(7) as usize],
        d,
        std::str::from_utf8(MONTHS[(m - 1) as usize]).unwrap_or("Jan"),
        y,
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cc(s: &str) -> CacheControl {
        CacheControl::parse([s.as_bytes()])
    }

    #[test]
    fn parses_directives() {
        let c = cc("public, max-age=60, s-maxage=\"120\", stale-while-revalidate=30, no-cache=\"Set-Cookie, X\"");
        assert!(c.public && c.no_cache);
        assert_eq!(c.max_age, Some(60));
        assert_eq!(c.s_maxage, Some(120));
        assert_eq!(c.stale_while_revalidate, Some(30));
        assert_eq!(cc("max-age=abc").max_age, Some(0));
        assert_eq!(cc("max-age=99999999999999").max_age, Some(MAX_DELTA));
        assert_eq!(cc("max-stale").max_stale, Some(u64::MAX));
        // A repeated max-age or s-maxage: the first counts (§4.2.1).
        assert_eq!(cc("max-age=0, max-age=31536000").max_age, Some(0));
        assert_eq!(cc("s-maxage=5, s-maxage=99").s_maxage, Some(5));
        assert_eq!(cc("MAX-AGE=5").max_age, Some(5));
        let two = CacheControl::parse([&b"private"[..], &b"max-age=3"[..]]);
        assert!(two.private);
        assert_eq!(two.max_age, Some(3));
    }

    fn get() -> RequestFacts {
        RequestFacts {
            is_get: true,
            ..Default::default()
        }
    }

    fn resp(status: u16, c: &str) -> ResponseFacts {
        ResponseFacts {
            status,
            cc: cc(c),
            ..Default::default()
        }
    }

    /// RFC 9111 §3 storability, case by case.
    #[test]
    fn storability_table() {
        let auth = RequestFacts {
            has_authorization: true,
            ..get()
        };
        let head = RequestFacts::default();
        let g = get();
        let req_no_store = RequestFacts {
            cc: cc("no-store"),
            ..get()
        };
        let cookie = ResponseFacts {
            has_set_cookie: true,
            ..resp(200, "max-age=60")
        };
        let cookie_public = ResponseFacts {
            has_set_cookie: true,
            ..resp(200, "public, max-age=60")
        };
        let vary_star = ResponseFacts {
            vary_star: true,
            ..resp(200, "max-age=60")
        };
        let expires = ResponseFacts {
            expires: Some(100),
            ..resp(302, "")
        };
        let cases: Vec<(&RequestFacts, ResponseFacts, Result<(), NotStored>)> = vec![
            (&g, resp(200, ""), Ok(())),
            (&g, resp(200, "max-age=60"), Ok(())),
            (&g, resp(404, ""), Ok(())),
            (&g, resp(302, ""), Err("not-cacheable-status")),
            (&g, resp(302, "max-age=10"), Ok(())),
            (&g, expires, Ok(())),
            (&g, resp(500, ""), Err("not-cacheable-status")),
            (&g, resp(503, "public"), Ok(())),
            (&g, resp(200, "no-store"), Err("no-store")),
            (&req_no_store, resp(200, "max-age=60"), Err("no-store")),
            (&g, resp(200, "private, max-age=60"), Err("private")),
            (&g, resp(200, "no-cache"), Ok(())),
            // no-cache alone does not make a status storable (§3).
            (&g, resp(302, "no-cache"), Err("not-cacheable-status")),
            (&g, resp(302, "no-cache, max-age=5"), Ok(())),
            (&g, resp(206, "max-age=60"), Err("status")),
            (&head, resp(200, "max-age=60"), Err("method")),
            (&auth, resp(200, "max-age=60"), Err("authorization")),
            (&auth, resp(200, "s-maxage=60"), Ok(())),
            (&auth, resp(200, "public, max-age=60"), Ok(())),
            (&auth, resp(200, "must-revalidate, max-age=60"), Ok(())),
            (&g, cookie, Err("set-cookie")),
            (&g, cookie_public, Ok(())),
            (&g, vary_star, Err("vary-star")),
        ];
        for (i, (req, r, want)) in cases.into_iter().enumerate() {
            assert_eq!(storable(req, &r), want, "case {i}: {r:?}");
        }
    }

    #[test]
    fn freshness_lifetimes() {
        assert_eq!(
            freshness_lifetime(&resp(200, "max-age=60, s-maxage=5"), 0),
            5
        );
        assert_eq!(freshness_lifetime(&resp(200, "max-age=60"), 0), 60);
        let e = ResponseFacts {
            expires: Some(1_000_100),
            date: Some(1_000_000),
            ..resp(200, "")
        };
        assert_eq!(freshness_lifetime(&e, 0), 100);
        let past = ResponseFacts {
            expires: Some(10),
            date: Some(1_000_000),
            ..resp(200, "")
        };
        assert_eq!(freshness_lifetime(&past, 0), 0);
        let bad = ResponseFacts {
            expires_invalid: true,
            ..resp(200, "")
        };
        assert_eq!(freshness_lifetime(&bad, 0), 0);
        let lm = ResponseFacts {
            last_modified: Some(1_000_000 - 1000),
            date: Some(1_000_000),
            ..resp(200, "")
        };
        assert_eq!(freshness_lifetime(&lm, 0), 100);
        let lm_302 = ResponseFacts {
            last_modified: Some(0),
            date: Some(1_000_000),
            ..resp(302, "")
        };
        assert_eq!(freshness_lifetime(&lm_302, 0), 0);
        let old = ResponseFacts {
            last_modified: Some(0),
            date: Some(1_000_000_000),
            ..resp(200, "")
        };
        assert_eq!(freshness_lifetime(&old, 0), MAX_HEURISTIC_SECS);
    }

    #[test]
    fn age_calculation() {
        // Origin said Age 10; it took 2 s to arrive; Date is 5 s before arrival.
        let r = ResponseFacts {
            age: Some(10),
            date: Some(995),
            ..resp(200, "")
        };
        let t = Timing::new(&r, 998, 1000);
        assert_eq!(t.initial_age, 12);
        assert_eq!(t.current_age(1030), 42);
        // A Date in the future does not make the age negative.
        let r = ResponseFacts {
            date: Some(2000),
            ..resp(200, "")
        };
        assert_eq!(Timing::new(&r, 1000, 1000).current_age(1000), 0);
    }

    #[test]
    fn stale_on_arrival_counts_the_upstream_s_age_only() {
        let at = |cc: &str, age: Option<u64>, date: Option<i64>| {
            let r = ResponseFacts {
                age,
                date,
                ..resp(200, cc)
            };
            stale_on_arrival(&r, freshness_lifetime(&r, 1000), 1000)
        };
        assert!(!at("max-age=60", Some(59), None));
        assert!(at("max-age=60", Some(60), None));
        assert!(at("max-age=60", Some(120), None));
        // A Date two minutes old; one second of a Date is its rounding.
        assert!(at("max-age=60", None, Some(880)));
        assert!(!at("max-age=60", None, Some(940)));
        assert!(at("max-age=60", None, Some(939)));
        // max-age=1 dated in the previous second is still usable.
        assert!(!at("max-age=1", None, Some(999)));
        // A stale-while-revalidate window keeps it usable (stale, refreshed).
        assert!(!at("max-age=60, stale-while-revalidate=30", Some(80), None));
        assert!(at("max-age=60, stale-while-revalidate=30", Some(90), None));
    }

    #[test]
    fn request_directives_and_staleness() {
        let plain = cc("max-age=60");
        assert_eq!(usable(&plain, 60, 10, &get()), Use::Fresh);
        assert_eq!(usable(&plain, 60, 60, &get()), Use::Revalidate);
        let req = |s: &str| RequestFacts { cc: cc(s), ..get() };
        assert_eq!(usable(&plain, 60, 10, &req("no-cache")), Use::Revalidate);
        let pragma = RequestFacts {
            pragma_no_cache: true,
            ..get()
        };
        assert_eq!(usable(&plain, 60, 10, &pragma), Use::Revalidate);
        assert_eq!(usable(&plain, 60, 10, &req("max-age=5")), Use::Revalidate);
        assert_eq!(usable(&plain, 60, 10, &req("max-age=20")), Use::Fresh);
        assert_eq!(
            usable(&plain, 60, 50, &req("min-fresh=20")),
            Use::Revalidate
        );
        assert_eq!(usable(&plain, 60, 70, &req("max-stale=20")), Use::StaleOk);
        assert_eq!(
            usable(&plain, 60, 90, &req("max-stale=20")),
            Use::Revalidate
        );
        assert_eq!(usable(&plain, 60, 1000, &req("max-stale")), Use::StaleOk);
        // max-stale does not lift the request's own max-age or min-fresh.
        assert_eq!(
            usable(&plain, 60, 70, &req("max-age=0, max-stale=3600")),
            Use::Revalidate
        );
        assert_eq!(
            usable(&plain, 60, 70, &req("max-age=100, max-stale=3600")),
            Use::StaleOk
        );
        assert_eq!(
            usable(&plain, 60, 70, &req("min-fresh=1, max-stale")),
            Use::Revalidate
        );
        let swr = cc("max-age=60, stale-while-revalidate=30");
        assert_eq!(usable(&swr, 60, 80, &get()), Use::StaleOk);
        assert_eq!(usable(&swr, 60, 80, &req("min-fresh=5")), Use::Revalidate);
        assert_eq!(usable(&swr, 60, 100, &get()), Use::Revalidate);
        let strict = cc("max-age=60, must-revalidate, stale-while-revalidate=30");
        assert_eq!(usable(&strict, 60, 70, &req("max-stale")), Use::Revalidate);
        assert_eq!(usable(&strict, 60, 70, &get()), Use::Revalidate);
        assert_eq!(
            usable(&cc("no-cache, max-age=60"), 60, 1, &get()),
            Use::Revalidate
        );
        assert_eq!(
            usable(&cc("s-maxage=60"), 60, 61, &req("max-stale")),
            Use::Revalidate
        );
    }

    #[test]
    fn stale_if_error_window() {
        let c = cc("max-age=10, stale-if-error=60");
        assert!(stale_if_error_ok(&c, &CacheControl::default(), 10, 50));
        assert!(!stale_if_error_ok(&c, &CacheControl::default(), 10, 100));
        assert!(stale_if_error_ok(
            &cc("max-age=10"),
            &cc("stale-if-error=100"),
            10,
            100
        ));
        assert!(!stale_if_error_ok(
            &cc("max-age=10, must-revalidate, stale-if-error=60"),
            &CacheControl::default(),
            10,
            20
        ));
        assert!(!stale_if_error_ok(
            &cc("no-cache, max-age=10, stale-if-error=60"),
            &CacheControl::default(),
            10,
            20
        ));
    }

    #[test]
    fn http_dates() {
        let t = 784_111_777; // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(parse_http_date(b"Sun, 06 Nov 1994 08:49:37 GMT"), Some(t));
        assert_eq!(parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT"), Some(t));
        assert_eq!(parse_http_date(b"Sun Nov  6 08:49:37 1994"), Some(t));
        assert_eq!(format_http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(parse_http_date(b"0"), None);
        assert_eq!(parse_http_date(b"Sun, 06 Nov 1994 25:49:37 GMT"), None);
        assert_eq!(parse_http_date(b"Sun, 32 Nov 1994 08:49:37 GMT"), None);
        for t in [
            0i64,
            951_782_400,
            1_709_164_800,
            4_102_444_800,
            1_798_761_599,
        ] {
            assert_eq!(
                parse_http_date(format_http_date(t).as_bytes()),
                Some(t),
                "{t}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn dates_roundtrip(t in 0i64..8_000_000_000) {
            proptest::prop_assert_eq!(parse_http_date(format_http_date(t).as_bytes()), Some(t));
        }

        #[test]
        fn cache_control_never_panics(v in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = CacheControl::parse([v.as_slice()]);
            let _ = parse_http_date(&v);
        }
    }
}
