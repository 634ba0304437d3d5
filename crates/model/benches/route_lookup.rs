//! Route lookup cost over 10,000 routes (host + path prefix), the data plane's per-request
//! routing work. Target: under 1 µs per lookup.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::HeaderMap;
use meshgate_model::matcher::{PathMatch, RequestInfo, StringMatch};
use meshgate_model::snapshot::{DirectResponse, HeaderOps, RequestMatch, Route, RouteAction, RouteTable, VirtualHost};

/// `hosts` virtual hosts (half exact names, half `*.` wildcards) with `per_host` prefix routes.
fn table(hosts: usize, per_host: usize) -> RouteTable {
    let mut t = RouteTable::default();
    for h in 0..hosts {
        let domain = if h % 2 == 0 {
            format!("svc-{h}.example.com")
        } else {
            format!("*.zone-{h}.example.com")
        };
        let routes = (0..per_host)
            .map(|r| Route {
                name: format!("h{h}r{r}"),
                matches: vec![RequestMatch {
                    path: Some(PathMatch {
                        matcher: StringMatch::Prefix(format!("/api/v{r}/")),
                        ignore_case: false,
                        segment_prefix: false,
                    }),
                    ..Default::default()
                }],
                action: RouteAction::DirectResponse(DirectResponse {
                    status: 200,
                    body: Bytes::new(),
                }),
                request_headers: HeaderOps::default(),
                response_headers: HeaderOps::default(),
                mirrors: Vec::new(),
                cors: None,
                plugins: None,
            })
            .collect();
        t.virtual_hosts.push(VirtualHost {
            name: domain.clone(),
            domains: vec![domain],
            routes,
            https_redirect: false,
        });
    }
    t.index();
    t
}

fn lookup(c: &mut Criterion) {
    let headers = HeaderMap::new();
    for (hosts, per_host) in [(1000, 10), (100, 100)] {
        let t = table(hosts, per_host);
        // Worst case inside a host: the last route matches.
        let exact_host = format!("svc-{}.example.com", (hosts / 2) & !1);
        let wildcard_host = format!("api.zone-{}.example.com", hosts - 1);
        let path = format!("/api/v{}/items/42", per_host - 1);
        for (label, host) in [("exact host", &exact_host), ("wildcard host", &wildcard_host)] {
            c.bench_function(
                &format!("{hosts} hosts x {per_host} prefix routes, {label}, last route"),
                |b| {
                    b.iter(|| {
                        let req = RequestInfo {
                            host: black_box(host),
                            authority: host,
                            path: black_box(&path),
                            query: None,
                            method: "GET",
                            scheme: "http",
                            port: 80,
                            headers: &headers,
                            sni: None,
                        };
                        let found = t.find(&req).expect("route");
                        black_box(found.route_index)
                    })
                },
            );
        }
    }
}

criterion_group!(benches, lookup);
criterion_main!(benches);
