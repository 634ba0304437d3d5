//! Test vectors from RFC 7541 Appendix C, and the error cases of §4–§6.

use super::*;

fn hex(s: &str) -> Bytes {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect::<Vec<u8>>()
        .into()
}

fn decode(decoder: &mut Decoder, block: &str) -> Result<Vec<Field>, DecodeError> {
    let mut fields = Vec::new();
    decoder.decode(&hex(block), |f, _| fields.push(f))?;
    Ok(fields)
}

fn header(name: &'static str, value: &'static str) -> Field {
    Field::Header(HeaderName::from_static(name), HeaderValue::from_static(value))
}

fn request(scheme: Scheme, path: &'static str, extra: Option<Field>) -> Vec<Field> {
    let mut fields = vec![
        Field::Method(Method::GET),
        Field::Scheme(scheme),
        Field::Path(PathAndQuery::from_static(path)),
        Field::Authority(Authority::from_static("www.example.com")),
    ];
    fields.extend(extra);
    fields
}

/// C.3 (raw strings) and C.4 (Huffman-coded strings) are the same three requests on one
/// connection; the dynamic table grows to 57, 110 and 164 octets.
fn three_requests(blocks: [&str; 3]) {
    let mut d = Decoder::new(4096);
    assert_eq!(decode(&mut d, blocks[0]).unwrap(), request(Scheme::HTTP, "/", None));
    assert_eq!(d.table.size, 57);
    assert_eq!(
        decode(&mut d, blocks[1]).unwrap(),
        request(Scheme::HTTP, "/", Some(header("cache-control", "no-cache")))
    );
    assert_eq!(d.table.size, 110);
    assert_eq!(
        decode(&mut d, blocks[2]).unwrap(),
        request(Scheme::HTTPS, "/index.html", Some(header("custom-key", "custom-value")))
    );
    assert_eq!(d.table.size, 164);
    assert_eq!(d.table.entries.len(), 3);
}

#[test]
fn rfc7541_c3_requests_without_huffman() {
    three_requests([
        "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
        "8286 84be 5808 6e6f 2d63 6163 6865",
        "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
    ]);
}

#[test]
fn rfc7541_c4_requests_with_huffman() {
    three_requests([
        "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
        "8286 84be 5886 a8eb 1064 9cbf",
        "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
    ]);
}

/// C.6: responses with Huffman coding and a 256-octet table, so entries are evicted.
#[test]
fn rfc7541_c6_responses_evict_the_oldest_entries() {
    let mut d = Decoder::new(256);
    let first = decode(
        &mut d,
        "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
    )
    .unwrap();
    assert_eq!(
        first,
        vec![
            Field::Status(Bytes::from_static(b"302")),
            header("cache-control", "private"),
            header("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
            header("location", "https://www.example.com"),
        ]
    );
    assert_eq!(d.table.size, 222);
    let second = decode(&mut d, "4883 640e ffc1 c0bf").unwrap();
    assert_eq!(second[0], Field::Status(Bytes::from_static(b"307")));
    assert_eq!(second[3], header("location", "https://www.example.com"));
    assert_eq!(d.table.size, 222);
    let third = decode(
        &mut d,
        "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
    )
    .unwrap();
    assert_eq!(third[0], Field::Status(Bytes::from_static(b"200")));
    assert_eq!(third[2], header("date", "Mon, 21 Oct 2013 20:13:22 GMT"));
    assert_eq!(third[4], header("content-encoding", "gzip"));
    assert_eq!(
        third[5],
        header("set-cookie", "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1")
    );
    assert_eq!(d.table.size, 215);
    assert_eq!(d.table.entries.len(), 3);
}

#[test]
fn rfc7541_c1_integers() {
    let mut out = Vec::new();
    encode_int(10, 5, 0, &mut out);
    assert_eq!(out, [0x0a]);
    out.clear();
    encode_int(1337, 5, 0, &mut out);
    assert_eq!(out, [0x1f, 0x9a, 0x0a]);
    let mut pos = 0;
    assert_eq!(decode_int(&out, &mut pos, 5), Ok(1337));
    assert_eq!(pos, 3);
    out.clear();
    encode_int(42, 8, 0, &mut out);
    assert_eq!(out, [0x2a]);
    // A prefix full of ones, then a continuation that never ends, then one that is too long.
    assert!(decode_int(&[0x1f, 0x80], &mut 0, 5).is_err());
    assert!(decode_int(&[0x1f, 0xff, 0xff, 0xff, 0xff, 0x0f], &mut 0, 5).is_err());
}

#[test]
fn rfc7541_c2_literal_kinds() {
    // With incremental indexing: added to the table (55 octets).
    let mut d = Decoder::new(4096);
    let fields = decode(
        &mut d,
        "400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",
    )
    .unwrap();
    assert_eq!(fields, vec![header("custom-key", "custom-header")]);
    assert_eq!(d.table.size, 55);
    // Without indexing and never indexed: the table is unchanged.
    let mut d = Decoder::new(4096);
    let fields = decode(&mut d, "040c 2f73 616d 706c 652f 7061 7468").unwrap();
    assert_eq!(fields, vec![Field::Path(PathAndQuery::from_static("/sample/path"))]);
    let fields = decode(&mut d, "1008 7061 7373 776f 7264 0673 6563 7265 74").unwrap();
    assert_eq!(fields, vec![header("password", "secret")]);
    assert_eq!(d.table.size, 0);
}

#[test]
fn huffman_padding_must_be_short_and_all_ones() {
    let mut out = Vec::new();
    // 'a' is 00011: padded with 111 it decodes; with 000 it does not.
    huffman::decode(&[0x1f], &mut out).unwrap();
    assert_eq!(out, b"a");
    assert!(huffman::decode(&[0x18], &mut Vec::new()).is_err());
    // Eight bits of padding are too many.
    assert!(huffman::decode(&[0x1f, 0xff], &mut Vec::new()).is_err());
    // The 30-bit EOS code may not appear in the string.
    assert!(huffman::decode(&[0xff, 0xff, 0xff, 0xff], &mut Vec::new()).is_err());
    // Five zero bits are '0', not padding.
    out.clear();
    huffman::decode(&[0x07], &mut out).unwrap();
    assert_eq!(out, b"0");
}

#[test]
fn huffman_decodes_a_known_string() {
    // "www.example.com", from C.4.1.
    let mut out = Vec::new();
    huffman::decode(&hex("f1e3 c2e5 f23a 6ba0 ab90 f4ff"), &mut out).unwrap();
    assert_eq!(out, b"www.example.com");
}

#[test]
fn size_updates_come_first_and_stay_within_the_setting() {
    let mut d = Decoder::new(4096);
    // Size update to 0 evicts everything; then one to 100 is fine.
    decode(
        &mut d,
        "400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",
    )
    .unwrap();
    assert_eq!(decode(&mut d, "20 3f45 82").unwrap(), vec![Field::Method(Method::GET)]);
    assert_eq!(d.table.size, 0);
    assert_eq!(d.table.max, 100);
    // After a field, or above the advertised size: COMPRESSION_ERROR.
    assert!(decode(&mut d, "82 20").is_err());
    assert!(decode(&mut d, "3fe2 1f").is_err());
}

#[test]
fn bad_indexes_and_truncated_blocks_fail() {
    let mut d = Decoder::new(4096);
    assert!(decode(&mut d, "80").is_err(), "index 0");
    assert!(decode(&mut d, "be").is_err(), "dynamic index with an empty table");
    assert!(decode(&mut d, "7f00 0161").is_err(), "name index past the table");
    assert!(
        decode(&mut d, "400a 6375 7374").is_err(),
        "string longer than the block"
    );
    assert!(decode(&mut d, "40").is_err(), "literal without its name");
}

#[test]
fn malformed_fields_are_reported_and_still_indexed() {
    let mut d = Decoder::new(4096);
    // "Custom-Key: v" with incremental indexing: upper case is malformed in HTTP/2.
    let fields = decode(&mut d, "400a 4375 7374 6f6d 2d4b 6579 0176").unwrap();
    assert_eq!(fields, vec![Field::Malformed]);
    assert_eq!(d.table.size, 10 + 1 + 32);
    // The entry still occupies index 62, so later indexes stay in step with the peer's table.
    assert_eq!(decode(&mut d, "be").unwrap(), vec![Field::Malformed]);
    // A value with leading whitespace, and an unknown pseudo-header.
    assert_eq!(decode(&mut d, "0003 6b65 7902 2076").unwrap(), vec![Field::Malformed]);
    assert_eq!(decode(&mut d, "0004 3a66 6f6f 0176").unwrap(), vec![Field::Malformed]);
    // A literal that reuses the name of the entry with a valid value: still malformed (the
    // name has upper case), but sized from the name's length.
    let mut sizes = Vec::new();
    d.decode(&hex("0f2f 0177"), |_, size| sizes.push(size)).unwrap();
    assert_eq!(sizes, vec![10 + 1 + 32]);
}

#[test]
fn an_entry_larger_than_the_table_empties_it() {
    let mut d = Decoder::new(60);
    decode(&mut d, "4003 6b65 7901 76").unwrap();
    assert_eq!(d.table.entries.len(), 1);
    // 3 + 30 + 32 > 60.
    let mut block = hex("4003 6b65 791e").to_vec();
    block.extend_from_slice(&[b'x'; 30]);
    d.decode(&block.into(), |_, _| ()).unwrap();
    assert_eq!(d.table.entries.len(), 0);
    assert_eq!(d.table.size, 0);
}

#[test]
fn encoded_responses_decode_to_the_same_fields() {
    let mut headers = HeaderMap::new();
    headers.insert(header::SERVER, HeaderValue::from_static("nginx/1.22.1"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("2"));
    headers.append("x-custom", HeaderValue::from_static("one"));
    headers.append("x-custom", HeaderValue::from_static("two"));
    let mut secret = HeaderValue::from_static("session=1");
    secret.set_sensitive(true);
    headers.insert(header::SET_COOKIE, secret);
    for status in [StatusCode::OK, StatusCode::IM_A_TEAPOT, StatusCode::NOT_FOUND] {
        let mut out = Vec::new();
        Encoder::default().encode_response(status, &headers, &mut out);
        // x-custom and server are indexed on the way, set-cookie never is.
        let mut fields = Vec::new();
        Decoder::new(4096).decode(&out.into(), |f, _| fields.push(f)).unwrap();
        assert_eq!(
            fields[0],
            Field::Status(Bytes::copy_from_slice(status.as_str().as_bytes()))
        );
        let rest: Vec<Field> = headers
            .iter()
            .map(|(n, v)| Field::Header(n.clone(), v.clone()))
            .collect();
        assert_eq!(fields[1..], rest[..]);
    }
    // The sensitive value is sent never indexed (0001 with name index 55: 0x1f 0x28).
    let mut out = Vec::new();
    let mut only_secret = HeaderMap::new();
    only_secret.insert(header::SET_COOKIE, headers[header::SET_COOKIE].clone());
    Encoder::default().encode_trailers(&only_secret, &mut out);
    assert_eq!(&out[..2], &[0x1f, 0x28]);
}

#[test]
fn a_changed_peer_table_size_is_acknowledged_once() {
    let mut encoder = Encoder::default();
    encoder.peer_table_size_changed(0);
    let mut out = Vec::new();
    encoder.encode_response(StatusCode::OK, &HeaderMap::new(), &mut out);
    assert_eq!(out, [0x20, 0x88]);
    out.clear();
    encoder.encode_response(StatusCode::OK, &HeaderMap::new(), &mut out);
    assert_eq!(out, [0x88]);
    // With no table allowed, nothing is indexed.
    let mut headers = HeaderMap::new();
    headers.insert(header::SERVER, HeaderValue::from_static("meshgate"));
    out.clear();
    encoder.encode_response(StatusCode::OK, &headers, &mut out);
    assert_eq!(out[1], 0x0f, "literal without indexing, name index 54");
    assert!(encoder.table.is_empty());
}

/// Repeated fields become one-octet indexes, and the peer's decoder (ours, here) stays in
/// step through evictions in a small table.
#[test]
fn repeated_fields_are_indexed_and_tables_stay_in_step() {
    let mut encoder = Encoder::default();
    encoder.peer_table_size_changed(120);
    let mut decoder = Decoder::new(120);
    let mut sizes = Vec::new();
    for round in 0..6 {
        let mut headers = HeaderMap::new();
        headers.insert(header::SERVER, HeaderValue::from_static("nginx/1.22.1"));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(round));
        // A value that changes every other round evicts older entries from the small table.
        headers.insert("x-round", HeaderValue::from(round / 2));
        let mut out = Vec::new();
        encoder.encode_response(StatusCode::OK, &headers, &mut out);
        sizes.push(out.len());
        let mut fields = Vec::new();
        decoder.decode(&out.into(), |f, _| fields.push(f)).unwrap();
        let expected: Vec<Field> = std::iter::once(Field::Status(Bytes::from_static(b"200")))
            .chain(headers.iter().map(|(n, v)| Field::Header(n.clone(), v.clone())))
            .collect();
        assert_eq!(fields, expected, "round {round}");
        assert_eq!(decoder.table.size, encoder.size, "round {round}");
    }
    assert!(sizes[1] < sizes[0], "indexed fields are one octet: {sizes:?}");
}

/// Encodes with the canonical code rebuilt from the decoder's own tables (RFC 7541 App. B).
fn huffman_encode(input: &[u8]) -> Vec<u8> {
    let mut codes = [(0u32, 0usize); 257];
    let mut code = 0u32;
    let mut at = 0usize;
    for len in 1..=30 {
        for _ in 0..huffman::CODES_OF_LENGTH[len] {
            codes[usize::from(huffman::SYMBOLS[at])] = (code, len);
            code += 1;
            at += 1;
        }
        code <<= 1;
    }
    let (mut bits, mut count, mut out) = (0u64, 0usize, Vec::new());
    for &b in input {
        let (code, len) = codes[usize::from(b)];
        bits = (bits << len) | u64::from(code);
        count += len;
        while count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    if count > 0 {
        out.push(((bits << (8 - count)) | ((1 << (8 - count)) - 1)) as u8);
    }
    out
}

#[test]
fn huffman_decodes_every_octet_at_every_bit_offset() {
    // The codes of 'a' (5 bits) shift each octet's code through every alignment, and a long
    // code after a few short ones must not be mistaken for padding.
    for octet in 0..=255u8 {
        for lead in 0..8 {
            let mut input = vec![b'a'; lead];
            input.push(octet);
            input.extend_from_slice(b"%a");
            let mut out = Vec::new();
            huffman::decode(&huffman_encode(&input), &mut out)
                .unwrap_or_else(|e| panic!("{octet:#x} after {lead}: {e}"));
            assert_eq!(out, input);
        }
    }
}

#[test]
fn the_smallest_table_size_is_announced_first() {
    let mut encoder = Encoder::default();
    encoder.peer_table_size_changed(0);
    encoder.peer_table_size_changed(4096);
    let mut out = Vec::new();
    encoder.encode_trailers(&HeaderMap::new(), &mut out);
    // 0, then 4096 (0x3f 0xe1 0x1f).
    assert_eq!(out, [0x20, 0x3f, 0xe1, 0x1f]);
}
