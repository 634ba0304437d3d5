//! Reading URI components as Kong (nginx) reads them: percent-decoding (RFC 3986 §2.1) of path
//! segments and query values, and nginx's normalised `$uri`.

/// Decodes `%XX` escapes; a `%` not followed by two hex digits stays as it is. Query values
/// (`application/x-www-form-urlencoded`) also turn `+` into a space.
fn decode(raw: &str, plus_is_space: bool) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                if let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A path segment, decoded.
pub fn decode_path_segment(segment: &str) -> String {
    decode(segment, false)
}

/// A query parameter's value (or name), decoded.
pub fn decode_query_value(value: &str) -> String {
    decode(value, true)
}

/// The decoded values of query parameter `name` (compared decoded, as Kong's
/// `get_uri_args`); a bare `name` with no `=` counts as `true`.
pub fn query_argument_values(query: &str, name: &str) -> Vec<String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter_map(|pair| {
            let (key, value) = match pair.split_once('=') {
                Some((key, value)) => (key, Some(value)),
                None => (pair, None),
            };
            (decode_query_value(key) == name).then(|| value.map_or_else(|| "true".to_string(), decode_query_value))
        })
        .collect()
}

/// nginx's `$uri` for a request path: percent-decoded, with runs of `/` merged and `.` and
/// `..` segments resolved. nginx refuses a `..` above the root (400); here, for hashing, it
/// stays at the root.
pub fn nginx_normalized_path(path: &str) -> String {
    let decoded = decode_path_segment(path);
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut out = String::with_capacity(decoded.len() + 1);
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_escapes_and_keeps_stray_percent_signs() {
        assert_eq!(decode_query_value("a%2Bb+c"), "a+b c");
        assert_eq!(decode_path_segment("a%2Bb+c"), "a+b+c");
        assert_eq!(decode_query_value("100%"), "100%");
        assert_eq!(decode_path_segment("%zz%4"), "%zz%4");
    }

    #[test]
    fn query_arguments_as_kong_reads_them() {
        assert_eq!(query_argument_values("a=2&b=1&a=1", "a"), ["2", "1"]);
        assert_eq!(query_argument_values("x&a=%41", "x"), ["true"]);
        assert_eq!(query_argument_values("my%20arg=v", "my arg"), ["v"]);
        assert!(query_argument_values("ab=1", "a").is_empty());
        assert_eq!(query_argument_values("a=", "a"), [""]);
    }

    #[test]
    fn paths_are_normalised_as_nginx_does() {
        assert_eq!(nginx_normalized_path("/a//b/./c/../d"), "/a/b/d");
        assert_eq!(nginx_normalized_path("/a%20b/"), "/a b/");
        assert_eq!(nginx_normalized_path("/../x"), "/x");
        assert_eq!(nginx_normalized_path("/"), "/");
        assert_eq!(nginx_normalized_path("/a/.."), "/");
        assert_eq!(nginx_normalized_path("/users/7"), "/users/7");
    }
}
