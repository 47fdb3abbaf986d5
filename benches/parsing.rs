//! Criterion benches for the pure request-path parsers: routes, names, `Accept`, ranges,
//! challenges and upstream routing, with typical and adversarial inputs.

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method, header};
use regcache::config::{Config, UpstreamConfig};
use regcache::media::Accept;
use regcache::reference::{Digest, Repository};
use regcache::rewrite::RoutingTable;
use regcache::{range, router, upstream::auth};

fn routes(c: &mut Criterion) {
    let d = format!("sha256:{}", "a".repeat(64));
    let blob = format!("/v2/library/alpine/blobs/{d}");
    let deep = format!("/v2/{}/manifests/latest", vec!["abc"; 60].join("/"));
    let hostile = format!("/v2/{}/manifests/latest", "a-".repeat(2000));
    let mut g = c.benchmark_group("router");
    g.bench_function("manifest_by_tag", |b| {
        b.iter(|| {
            router::parse(
                &Method::GET,
                black_box("/v2/library/alpine/manifests/3.20"),
                None,
            )
        })
    });
    g.bench_function("blob_with_ns", |b| {
        b.iter(|| router::parse(&Method::GET, black_box(&blob), Some("ns=docker.io")))
    });
    g.bench_function("deep_name", |b| {
        b.iter(|| router::parse(&Method::GET, black_box(&deep), None))
    });
    g.bench_function("hostile_long_name", |b| {
        b.iter(|| router::parse(&Method::GET, black_box(&hostile), None))
    });
    g.finish();

    c.bench_function("digest_parse", |b| {
        b.iter(|| black_box(&d).parse::<Digest>())
    });
    c.bench_function("repository_parse", |b| {
        b.iter(|| black_box("my-org/team_a/app.server").parse::<Repository>())
    });
}

fn headers(c: &mut Criterion) {
    let mut h = HeaderMap::new();
    for t in [
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "application/json",
    ] {
        h.append(header::ACCEPT, HeaderValue::from_static(t));
    }
    c.bench_function("accept_six_lines", |b| {
        b.iter(|| {
            let a = Accept::from_headers(black_box(&h));
            (
                a.key(),
                a.accepts("application/vnd.oci.image.index.v1+json"),
            )
        })
    });
    c.bench_function("range_parse", |b| {
        b.iter(|| range::parse(black_box(Some("bytes=1048576-")), 1 << 30))
    });
    let ch = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#;
    c.bench_function("www_authenticate", |b| {
        b.iter(|| auth::parse_challenges(black_box(ch)))
    });
}

fn rewrite(c: &mut Criterion) {
    let mut cfg = Config::default();
    for i in 0..20 {
        let mut u = UpstreamConfig::new(
            &format!("up{i}"),
            format!("https://r{i}.example").parse().unwrap(),
        );
        u.virtual_hosts = vec![format!("v{i}.cache.local")];
        cfg.upstreams.push(u);
    }
    let table = RoutingTable::new(&cfg.validate().unwrap());
    let short: Repository = "alpine".parse().unwrap();
    let prefixed: Repository = "up7/team/app".parse().unwrap();
    c.bench_function("rewrite_docker_hub_shorthand", |b| {
        b.iter(|| table.resolve(black_box(&short), None, None))
    });
    c.bench_function("rewrite_prefix", |b| {
        b.iter(|| table.resolve(black_box(&prefixed), None, None))
    });
    c.bench_function("rewrite_ns", |b| {
        b.iter(|| table.resolve(black_box(&prefixed), None, Some("docker.io")))
    });
}

fn hashing(c: &mut Criterion) {
    let data = vec![0x5au8; 1 << 20];
    let mut g = c.benchmark_group("hash");
    g.throughput(criterion::Throughput::Bytes(data.len() as u64));
    g.bench_function("sha256_1MiB", |b| {
        b.iter(|| Digest::of(regcache::reference::Algorithm::Sha256, black_box(&data)))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = routes, headers, rewrite, hashing
}
criterion_main!(benches);
