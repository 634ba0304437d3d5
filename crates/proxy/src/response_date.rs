//! The `Date` field meshgate adds to responses that lack one (RFC 9110 §6.6.1), as hyper
//! and Envoy do.

use http::HeaderValue;

/// The `Date` field for responses that lack one, formatted once per second per thread.
pub(crate) fn date_value() -> HeaderValue {
    thread_local! {
        static CACHED: std::cell::RefCell<(u64, HeaderValue)> =
            const { std::cell::RefCell::new((0, HeaderValue::from_static(""))) };
    }
    let now = std::time::SystemTime::now();
    let second = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            let formatted = httpdate::fmt_http_date(now);
            if let Ok(value) = HeaderValue::from_str(&formatted) {
                *cached = (second, value);
            }
        }
        cached.1.clone()
    })
}
