//! Rules that can never match. Routes are tried in order and the first match wins, so a rule
//! whose every match alternative is covered by an alternative of an earlier rule is dead
//! configuration; `meshgate analyze` and reloads report it as a warning.
//!
//! Coverage is decided conservatively: `true` only when it is certain. Regular expressions
//! cover only the identical expression, and case-insensitive paths only case-insensitive ones.

use crate::matcher::{HeaderMatch, PathMatch, QueryMatch, StringMatch};
use crate::snapshot::RequestMatch;

/// Above this many rules on one host the quadratic check is skipped; such tables are
/// generated, not written by hand.
pub(crate) const MAX_RULES_CHECKED: usize = 2000;

/// Whether every request that one of `later`'s alternatives matches is matched by one of
/// `earlier`'s. An empty list matches every request.
pub(crate) fn rule_covers(earlier: &[&RequestMatch], later: &[&RequestMatch]) -> bool {
    let everything = RequestMatch::default();
    let earlier: Vec<&RequestMatch> = if earlier.is_empty() {
        vec![&everything]
    } else {
        earlier.to_vec()
    };
    let later: Vec<&RequestMatch> = if later.is_empty() {
        vec![&everything]
    } else {
        later.to_vec()
    };
    later.iter().all(|l| earlier.iter().any(|e| match_covers(e, l)))
}

/// Whether every request `later` matches is also matched by `earlier`.
pub(crate) fn match_covers(earlier: &RequestMatch, later: &RequestMatch) -> bool {
    let path_ok = match (&earlier.path, &later.path) {
        (None, _) => true,
        (Some(e), Some(l)) => path_covers(e, l),
        (Some(e), None) => matches!(&e.matcher, StringMatch::Prefix(p) if p.is_empty() || (p == "/" && !e.ignore_case)),
    };
    path_ok
        && optional_covers(&earlier.method, &later.method)
        && optional_covers(&earlier.authority, &later.authority)
        && optional_covers(&earlier.scheme, &later.scheme)
        && (earlier.port.is_none() || earlier.port == later.port)
        && earlier
            .headers
            .iter()
            .all(|e| later.headers.iter().any(|l| header_covers(e, l)))
        && earlier
            .query
            .iter()
            .all(|e| later.query.iter().any(|l| query_covers(e, l)))
}

fn optional_covers(earlier: &Option<StringMatch>, later: &Option<StringMatch>) -> bool {
    match (earlier, later) {
        (None, _) => true,
        (Some(e), Some(l)) => string_covers(e, l),
        (Some(e), None) => matches!(e, StringMatch::Prefix(p) if p.is_empty()),
    }
}

/// Whether every value `later` accepts is accepted by `earlier`.
fn string_covers(earlier: &StringMatch, later: &StringMatch) -> bool {
    match (earlier, later) {
        (StringMatch::Prefix(e), _) if e.is_empty() => true,
        (StringMatch::Exact(e), StringMatch::Exact(l)) => e == l,
        (StringMatch::Prefix(e), StringMatch::Exact(l) | StringMatch::Prefix(l)) => l.starts_with(e.as_str()),
        (StringMatch::Regex(e), StringMatch::Regex(l)) => e.as_str() == l.as_str(),
        _ => false,
    }
}

fn path_covers(earlier: &PathMatch, later: &PathMatch) -> bool {
    if earlier.ignore_case != later.ignore_case {
        return false;
    }
    match (&earlier.matcher, earlier.segment_prefix) {
        // A segment prefix `/a` covers `/a` and everything under `/a/`, not `/ab`.
        (StringMatch::Prefix(e), true) => {
            let base = e.trim_end_matches('/');
            let under = |l: &str| l.len() > base.len() && l.starts_with(base) && l.as_bytes()[base.len()] == b'/';
            match &later.matcher {
                StringMatch::Exact(l) => l == base || under(l) || base.is_empty(),
                StringMatch::Prefix(l) => {
                    base.is_empty() || under(l) || (later.segment_prefix && l.trim_end_matches('/') == base)
                }
                StringMatch::Regex(_) => base.is_empty(),
            }
        }
        (e, _) => string_covers(e, &later.matcher),
    }
}

fn header_covers(earlier: &HeaderMatch, later: &HeaderMatch) -> bool {
    if earlier.name != later.name || earlier.invert != later.invert {
        return false;
    }
    match (&earlier.matcher, &later.matcher) {
        // Presence is implied by any positive condition on the same header.
        (None, _) => !earlier.invert || later.matcher.is_none(),
        (Some(e), Some(l)) if !earlier.invert => string_covers(e, l),
        (Some(e), Some(l)) => string_covers(e, l) && string_covers(l, e),
        (Some(_), None) => false,
    }
}

fn query_covers(earlier: &QueryMatch, later: &QueryMatch) -> bool {
    earlier.name == later.name
        && match (&earlier.matcher, &later.matcher) {
            (None, _) => true,
            (Some(e), Some(l)) => string_covers(e, l),
            (Some(_), None) => false,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(m: StringMatch, segment: bool) -> RequestMatch {
        RequestMatch {
            path: Some(PathMatch {
                matcher: m,
                ignore_case: false,
                segment_prefix: segment,
            }),
            ..RequestMatch::default()
        }
    }

    fn prefix(p: &str) -> StringMatch {
        StringMatch::Prefix(p.to_string())
    }

    fn exact(p: &str) -> StringMatch {
        StringMatch::Exact(p.to_string())
    }

    #[test]
    fn prefixes_cover_longer_paths() {
        assert!(match_covers(&path(prefix("/"), false), &path(exact("/a"), false)));
        assert!(match_covers(&path(prefix("/a"), false), &path(prefix("/ab"), false)));
        assert!(!match_covers(&path(prefix("/ab"), false), &path(prefix("/a"), false)));
        assert!(match_covers(&RequestMatch::default(), &path(exact("/x"), false)));
        assert!(!match_covers(&path(exact("/x"), false), &RequestMatch::default()));
    }

    #[test]
    fn segment_prefixes_respect_boundaries() {
        assert!(match_covers(&path(prefix("/a"), true), &path(exact("/a/b"), false)));
        assert!(match_covers(&path(prefix("/a"), true), &path(exact("/a"), false)));
        assert!(!match_covers(&path(prefix("/a"), true), &path(exact("/ab"), false)));
        assert!(match_covers(&path(prefix("/a/"), true), &path(prefix("/a"), true)));
        assert!(!match_covers(&path(prefix("/a"), true), &path(prefix("/a"), false)));
    }

    #[test]
    fn extra_conditions_narrow_a_match() {
        let mut with_header = path(prefix("/"), false);
        with_header.headers.push(HeaderMatch {
            name: "x-user".into(),
            matcher: Some(exact("a")),
            invert: false,
        });
        assert!(match_covers(&path(prefix("/"), false), &with_header));
        assert!(!match_covers(&with_header, &path(prefix("/"), false)));
        let mut presence = path(prefix("/"), false);
        presence.headers.push(HeaderMatch {
            name: "x-user".into(),
            matcher: None,
            invert: false,
        });
        assert!(match_covers(&presence, &with_header));
    }

    #[test]
    fn regexes_cover_only_themselves() {
        let re = |p: &str| path(StringMatch::regex(p).unwrap(), false);
        assert!(match_covers(&re("/a.*"), &re("/a.*")));
        assert!(!match_covers(&re("/a.*"), &path(exact("/ab"), false)));
    }

    #[test]
    fn a_rule_is_covered_only_when_all_its_alternatives_are() {
        let a = path(prefix("/a"), false);
        let b = path(prefix("/b"), false);
        let ab = path(prefix("/a/b"), false);
        assert!(rule_covers(&[&a, &b], &[&ab]));
        assert!(!rule_covers(&[&a], &[&ab, &b]));
        assert!(rule_covers(&[], &[&ab]));
    }
}
