//! Owns the push proof of fleet mode: three replicas behind nginx round robin, so the
//! requests of one upload land on different replicas; skopeo and `docker push` through the
//! balancer, then the images pulled back through it.

mod support;

use std::io::Write as _;
use std::time::{Duration, Instant};

use support::fleet::{Balancer, Fleet, Lane};
use support::image::{self, HELLO, Layer};
use support::peers::{Dockerd, require_peer};

/// Three replicas with push on for the htpasswd user `ci`, anonymous pulls, behind nginx.
async fn pushable_fleet() -> Result<(Fleet, Balancer, tempfile::TempDir), support::peers::Skip> {
    let mut fleet = Fleet::start(Lane::Seaweed, Duration::from_millis(1500)).await?;
    let dir = tempfile::tempdir().map_err(|e| support::peers::Skip::new(e.to_string()))?;
    let htpasswd = dir.path().join("htpasswd");
    let mut f = std::fs::File::create(&htpasswd).unwrap();
    writeln!(f, "ci:{}", bcrypt::hash("ci-pass", 4).unwrap()).unwrap();
    let mut spec = fleet.spec();
    spec.extra = format!(
        "[auth]\nhtpasswd = \"{}\"\npush = true\npush_users = [\"ci\"]\nanonymous_pull = true\n",
        htpasswd.display()
    );
    for _ in 0..3 {
        fleet.add_replica_with(&spec).await.expect("replica starts");
    }
    let addrs: Vec<_> = fleet.replicas.iter().map(|r| r.addr()).collect();
    let lb = Balancer::start(&addrs).await?;
    Ok((fleet, lb, dir))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_and_docker_push_through_a_round_robin_balancer_then_pull_back() {
    let started = Instant::now();
    let (fleet, lb, _dir) = require_peer!(pushable_fleet().await);
    let registry = &fleet.upstream.registry;
    let img = image::single_arch_with_layers("1", &[Layer::deterministic(3 << 20, 5)]).unwrap();

    // skopeo: each upload's POST, PATCH and PUT go to whichever replica nginx picks.
    let dest = format!("docker://{}/team/app:1", lb.host());
    let pushed = image::push(&img, &dest, Some(("ci", "ci-pass"))).await;
    let pushed = pushed.unwrap_or_else(|e| {
        panic!(
            "skopeo push through the balancer: {e:#}\nbalancer log: {:#?}\nupstream saw: {:#?}",
            lb.log(),
            fleet
                .upstream
                .relay
                .requests()
                .iter()
                .map(|s| format!("{} {} {:?} {}", s.method, s.path, s.query, s.status))
                .collect::<Vec<_>>()
        )
    });
    assert_eq!(pushed, img.digest());
    let upstream_digest = image::skopeo_inspect_digest(
        &format!("docker://{}/team/app:1", registry.host()),
        &["--tls-verify=false"],
    )
    .await
    .unwrap();
    assert_eq!(
        upstream_digest, pushed,
        "the upstream holds what skopeo pushed"
    );
    let uploads = lb.spread("/blobs/uploads/");
    eprintln!("skopeo push: upload requests per replica {uploads:?}");
    assert!(
        uploads.len() >= 2,
        "the upload requests were spread over replicas: {uploads:?}"
    );
    let pulled_dir = tempfile::tempdir().unwrap();
    let back = image::skopeo_pull(
        &format!("{}/team/app:1", lb.host()),
        &pulled_dir.path().join("oci"),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        back,
        vec![pushed.clone()],
        "skopeo pulls it back through the balancer"
    );

    // docker: login, pull back, tag, push under a new name, pull that back and run it.
    let host = lb.host();
    let docker = require_peer!(Dockerd::start(&[], &[host.as_str()]).await);
    docker
        .docker_ok(&["login", &host, "-u", "ci", "-p", "ci-pass"])
        .await
        .unwrap();
    let app = format!("{host}/team/app:1");
    docker.docker_ok(&["pull", &app]).await.unwrap();
    let target = format!("{host}/team/pushed:1");
    docker.docker_ok(&["tag", &app, &target]).await.unwrap();
    let before = lb.log().len();
    docker.docker_ok(&["push", &target]).await.unwrap();
    let push_requests: Vec<_> = lb.log().into_iter().skip(before).collect();
    let backends: std::collections::BTreeSet<_> = push_requests
        .iter()
        .filter(|(_, _, b, _)| b != "-")
        .map(|(_, _, b, _)| b.clone())
        .collect();
    eprintln!(
        "docker push: {} requests over {} replicas: {push_requests:?}",
        push_requests.len(),
        backends.len()
    );
    assert!(backends.len() >= 2, "docker's push was spread too");
    let at_upstream = image::skopeo_inspect_digest(
        &format!("docker://{}/team/pushed:1", registry.host()),
        &["--tls-verify=false"],
    )
    .await
    .unwrap();
    let through_fleet =
        image::skopeo_inspect_digest(&format!("docker://{target}"), &["--tls-verify=false"])
            .await
            .unwrap();
    assert_eq!(at_upstream, through_fleet);
    docker.docker_ok(&["rmi", &app, &target]).await.unwrap();
    docker.docker_ok(&["pull", &target]).await.unwrap();
    let out = docker
        .docker_ok(&["run", "--rm", "--network", "none", &target])
        .await
        .unwrap();
    assert_eq!(out.trim(), HELLO);
    drop(docker);

    // docker with `registry-mirrors` at the balancer: a Docker Hub name goes to the mirror
    // (its fallback, Docker Hub itself, is unreachable here, so only the fleet can answer).
    let docker = require_peer!(Dockerd::start(&[host.as_str()], &[host.as_str()]).await);
    let before = lb.log().len();
    docker.docker_ok(&["pull", "team/pushed:1"]).await.unwrap();
    let out = docker
        .docker_ok(&["run", "--rm", "--network", "none", "team/pushed:1"])
        .await
        .unwrap();
    assert_eq!(out.trim(), HELLO);
    let mirrored: Vec<_> = lb
        .log()
        .into_iter()
        .skip(before)
        .filter(|(_, path, _, _)| path.starts_with("/v2/team/pushed/"))
        .collect();
    eprintln!("docker pull through registry-mirrors: {mirrored:?}");
    assert!(
        mirrored
            .iter()
            .any(|(_, p, _, _)| p.contains("/manifests/")),
        "the pull went through the mirror: {mirrored:?}"
    );
    eprintln!(
        "push through the balancer proven in {:?}",
        started.elapsed()
    );
}
