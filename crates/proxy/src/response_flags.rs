//! Envoy's response flags: why a response is not simply the upstream's. They appear in access
//! logs (`%RESPONSE_FLAGS%`) and metrics under the names operators already know.

use std::fmt;

/// A set of response flags, carried on a response as an extension while it leaves the proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponseFlags(u16);

/// `(flag, Envoy's short name, meaning)` in Envoy's print order.
pub const ALL: [(ResponseFlags, &str, &str); 12] = [
    (ResponseFlags::NO_HEALTHY_UPSTREAM, "UH", "no healthy upstream host"),
    (
        ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
        "UF",
        "upstream connection failure",
    ),
    (
        ResponseFlags::UPSTREAM_OVERFLOW,
        "UO",
        "upstream overflow (circuit breaking)",
    ),
    (ResponseFlags::NO_ROUTE, "NR", "no route configured"),
    (
        ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED,
        "URX",
        "upstream retry limit exceeded",
    ),
    (
        ResponseFlags::UPSTREAM_REQUEST_TIMEOUT,
        "UT",
        "upstream request timeout",
    ),
    (
        ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION,
        "DC",
        "downstream connection termination",
    ),
    (
        ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
        "UC",
        "upstream connection termination",
    ),
    (
        ResponseFlags::FAULT_INJECTED,
        "FI",
        "request aborted with an injected fault",
    ),
    (
        ResponseFlags::DELAY_INJECTED,
        "DI",
        "request delayed with an injected fault",
    ),
    (ResponseFlags::RATE_LIMITED, "RL", "request rate limited locally"),
    (
        ResponseFlags::UNAUTHORIZED,
        "UAEX",
        "request denied by an authorization or authentication check",
    ),
];

impl ResponseFlags {
    pub const NONE: ResponseFlags = ResponseFlags(0);
    pub const NO_HEALTHY_UPSTREAM: ResponseFlags = ResponseFlags(1);
    pub const UPSTREAM_CONNECTION_FAILURE: ResponseFlags = ResponseFlags(1 << 1);
    pub const UPSTREAM_OVERFLOW: ResponseFlags = ResponseFlags(1 << 2);
    pub const NO_ROUTE: ResponseFlags = ResponseFlags(1 << 3);
    pub const UPSTREAM_RETRY_LIMIT_EXCEEDED: ResponseFlags = ResponseFlags(1 << 4);
    pub const UPSTREAM_REQUEST_TIMEOUT: ResponseFlags = ResponseFlags(1 << 5);
    pub const DOWNSTREAM_CONNECTION_TERMINATION: ResponseFlags = ResponseFlags(1 << 6);
    pub const UPSTREAM_CONNECTION_TERMINATION: ResponseFlags = ResponseFlags(1 << 7);
    pub const FAULT_INJECTED: ResponseFlags = ResponseFlags(1 << 8);
    pub const DELAY_INJECTED: ResponseFlags = ResponseFlags(1 << 9);
    pub const RATE_LIMITED: ResponseFlags = ResponseFlags(1 << 10);
    pub const UNAUTHORIZED: ResponseFlags = ResponseFlags(1 << 11);

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, other: ResponseFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Adds `flags` to the set a response already carries.
    pub fn mark<B>(response: &mut http::Response<B>, flags: ResponseFlags) {
        let current = response
            .extensions()
            .get::<ResponseFlags>()
            .copied()
            .unwrap_or_default();
        response.extensions_mut().insert(current | flags);
    }

    /// The flags a response carries (none when it has no extension).
    pub fn of<B>(response: &http::Response<B>) -> ResponseFlags {
        response
            .extensions()
            .get::<ResponseFlags>()
            .copied()
            .unwrap_or_default()
    }
}

impl std::ops::BitOr for ResponseFlags {
    type Output = ResponseFlags;
    fn bitor(self, rhs: ResponseFlags) -> ResponseFlags {
        ResponseFlags(self.0 | rhs.0)
    }
}

/// Envoy's `%RESPONSE_FLAGS%`: short names joined by `,`, or `-` when there are none.
impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        let mut first = true;
        for (flag, name, _) in ALL {
            if self.contains(flag) {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_print_like_envoy() {
        assert_eq!(ResponseFlags::NONE.to_string(), "-");
        assert_eq!(
            (ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED | ResponseFlags::UPSTREAM_CONNECTION_FAILURE).to_string(),
            "UF,URX"
        );
    }

    #[test]
    fn marks_accumulate_on_a_response() {
        let mut resp = http::Response::new(());
        assert!(ResponseFlags::of(&resp).is_empty());
        ResponseFlags::mark(&mut resp, ResponseFlags::DELAY_INJECTED);
        ResponseFlags::mark(&mut resp, ResponseFlags::FAULT_INJECTED);
        assert_eq!(ResponseFlags::of(&resp).to_string(), "FI,DI");
    }
}
