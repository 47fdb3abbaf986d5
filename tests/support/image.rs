//! Owns test images: OCI image layouts generated on disk without network (runnable busybox image, extra layers, multi-arch indexes) and the `skopeo` push / pull / inspect helpers.
//!
//! Everything generated is deterministic (fixed mtimes, owners, gzip header without name or
//! time) unless a layer is made with [`Layer::random`], so the same spec yields the same
//! digests across runs and two images built from the same [`Layer`] share that layer.
//! `skopeo` runs with `--insecure-policy`, a private empty auth file and registries.conf,
//! and [`super::peers::no_egress_env`].

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, bail};

use super::peers::{no_egress_env, run, run_ok};

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI gzip'd tar layer media type.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The annotation naming a tag in an OCI layout's `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// What the busybox image prints when run.
pub const HELLO: &str = "hello from regcache";

const MTIME: u64 = 1_700_000_000;
const CREATED: &str = "2023-11-14T22:13:20Z";

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    format!("sha256:{}", hex::encode(d.as_ref()))
}

/// An OS/architecture pair (`variant` e.g. `v8` for arm64).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// e.g. `linux`
    pub os: String,
    /// e.g. `amd64`, `arm64`
    pub architecture: String,
    /// e.g. `v8`
    pub variant: Option<String>,
}

impl Platform {
    /// `linux/amd64`
    pub fn amd64() -> Platform {
        Platform {
            os: "linux".to_string(),
            architecture: "amd64".to_string(),
            variant: None,
        }
    }

    /// `linux/arm64/v8`
    pub fn arm64() -> Platform {
        Platform {
            os: "linux".to_string(),
            architecture: "arm64".to_string(),
            variant: Some("v8".to_string()),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({"architecture": self.architecture, "os": self.os});
        if let Some(variant) = &self.variant {
            v["variant"] = serde_json::Value::String(variant.clone());
        }
        v
    }
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// Media type of the content.
    pub media_type: String,
    /// `sha256:<hex>`
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Platform, for manifests listed in an index.
    pub platform: Option<Platform>,
}

impl Descriptor {
    fn of(media_type: &str, data: &[u8]) -> Descriptor {
        Descriptor {
            media_type: media_type.to_string(),
            digest: sha256_digest(data),
            size: data.len() as u64,
            platform: None,
        }
    }

    fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        });
        if let Some(p) = &self.platform {
            v["platform"] = p.to_json();
        }
        v
    }
}

/// One entry of a layer's tar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarEntry {
    /// A directory (path without leading `/`, e.g. `bin`).
    Dir {
        /// Path inside the image.
        path: String,
    },
    /// A regular file.
    File {
        /// Path inside the image, e.g. `bin/busybox`.
        path: String,
        /// Content.
        data: Vec<u8>,
        /// Permission bits, e.g. `0o755`.
        mode: u32,
    },
    /// A symbolic link.
    Symlink {
        /// Path inside the image, e.g. `bin/sh`.
        path: String,
        /// Link target, e.g. `busybox`.
        target: String,
    },
}

/// A gzip'd tar layer held in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The gzip'd tar (the blob pushed to registries).
    pub blob: Vec<u8>,
    /// `sha256` of the uncompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: String,
    /// Descriptor of `blob` (media type [`OCI_LAYER_GZIP`]).
    pub descriptor: Descriptor,
}

impl Layer {
    /// Builds a layer from tar entries, in order (owner 0:0, fixed mtime). `compress` false
    /// stores the data uncompressed inside the gzip stream (fast for random content).
    pub fn from_entries(entries: &[TarEntry], compress: bool) -> anyhow::Result<Layer> {
        let mut builder = tar::Builder::new(Vec::new());
        for entry in entries {
            let mut header = tar::Header::new_gnu();
            header.set_mtime(MTIME);
            header.set_uid(0);
            header.set_gid(0);
            match entry {
                TarEntry::Dir { path } => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(0o755);
                    header.set_size(0);
                    builder.append_data(&mut header, format!("{path}/"), std::io::empty())?;
                }
                TarEntry::File { path, data, mode } => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(*mode);
                    header.set_size(data.len() as u64);
                    builder.append_data(&mut header, path, data.as_slice())?;
                }
                TarEntry::Symlink { path, target } => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    header.set_size(0);
                    builder.append_link(&mut header, path, target)?;
                }
            }
        }
        let tar = builder.into_inner()?;
        let level = if compress {
            flate2::Compression::fast()
        } else {
            flate2::Compression::none()
        };
        let mut gz = flate2::GzBuilder::new()
            .mtime(0)
            .write(Vec::with_capacity(tar.len() / 2 + 1024), level);
        gz.write_all(&tar)?;
        let blob = gz.finish()?;
        Ok(Layer {
            diff_id: sha256_digest(&tar),
            descriptor: Descriptor::of(OCI_LAYER_GZIP, &blob),
            blob,
        })
    }

    /// The runnable layer: static `/bin/busybox` (from `/usr/bin/busybox`, Debian
    /// `busybox-static`) with symlinks `/bin/sh` and `/bin/echo`. Built once per process.
    pub fn busybox() -> anyhow::Result<Layer> {
        static BUSYBOX: OnceLock<Layer> = OnceLock::new();
        if let Some(layer) = BUSYBOX.get() {
            return Ok(layer.clone());
        }
        let source = ["/usr/bin/busybox", "/bin/busybox"]
            .iter()
            .map(Path::new)
            .find(|p| p.is_file())
            .context("no /usr/bin/busybox: install Debian package busybox-static")?;
        let data = fs::read(source)?;
        let layer = Layer::from_entries(
            &[
                TarEntry::Dir {
                    path: "bin".to_string(),
                },
                TarEntry::File {
                    path: "bin/busybox".to_string(),
                    data,
                    mode: 0o755,
                },
                TarEntry::Symlink {
                    path: "bin/sh".to_string(),
                    target: "busybox".to_string(),
                },
                TarEntry::Symlink {
                    path: "bin/echo".to_string(),
                    target: "busybox".to_string(),
                },
            ],
            true,
        )?;
        Ok(BUSYBOX.get_or_init(|| layer).clone())
    }

    /// A layer with one file `data/layer-<seed>.bin` of `size` pseudo-random bytes generated
    /// from `seed`: same `(size, seed)`, same digest. Random data does not compress, so the
    /// blob is about `size` + 1.5 KiB.
    pub fn deterministic(size: usize, seed: u64) -> Layer {
        let mut data = vec![0u8; size];
        let mut state = seed ^ 0x5EED_0F2E_6CAC_4E00;
        for chunk in data.chunks_mut(8) {
            // splitmix64
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
        Layer::from_entries(
            &[
                TarEntry::Dir {
                    path: "data".to_string(),
                },
                TarEntry::File {
                    path: format!("data/layer-{seed:016x}.bin"),
                    data,
                    mode: 0o644,
                },
            ],
            false,
        )
        .expect("in-memory tar")
    }

    /// Like [`Layer::deterministic`] with a fresh random seed: a digest no cache has seen.
    pub fn random(size: usize) -> Layer {
        let mut seed = [0u8; 8];
        aws_lc_rs::rand::fill(&mut seed).expect("random bytes");
        Layer::deterministic(size, u64::from_le_bytes(seed))
    }

    /// A small layer holding text files `(path, content)`.
    pub fn text_files(files: &[(&str, &str)]) -> Layer {
        let entries: Vec<TarEntry> = files
            .iter()
            .map(|(path, content)| TarEntry::File {
                path: path.trim_start_matches('/').to_string(),
                data: content.as_bytes().to_vec(),
                mode: 0o644,
            })
            .collect();
        Layer::from_entries(&entries, true).expect("in-memory tar")
    }

    /// `sha256:<hex>` of the blob.
    pub fn digest(&self) -> &str {
        &self.descriptor.digest
    }
}

/// What one single-platform image is made of.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Its platform.
    pub platform: Platform,
    /// Layers, bottom first.
    pub layers: Vec<Layer>,
    /// Config `Cmd`.
    pub cmd: Vec<String>,
    /// Config `Env`.
    pub env: Vec<String>,
}

impl ImageSpec {
    /// The runnable amd64 image: [`Layer::busybox`], `Cmd ["/bin/busybox","echo",HELLO]`.
    pub fn busybox_amd64() -> anyhow::Result<ImageSpec> {
        Ok(ImageSpec {
            platform: Platform::amd64(),
            layers: vec![Layer::busybox()?],
            cmd: vec![
                "/bin/busybox".to_string(),
                "echo".to_string(),
                HELLO.to_string(),
            ],
            env: vec!["PATH=/bin".to_string()],
        })
    }

    /// A non-runnable arm64 image whose one small layer says `arm64`.
    pub fn placeholder_arm64() -> ImageSpec {
        ImageSpec {
            platform: Platform::arm64(),
            layers: vec![Layer::text_files(&[(
                "etc/regcache-e2e-arch",
                "arm64 placeholder, not runnable\n",
            )])],
            cmd: vec!["/bin/false".to_string()],
            env: vec!["PATH=/bin".to_string()],
        }
    }

    /// Adds a layer on top.
    pub fn with_layer(mut self, layer: Layer) -> ImageSpec {
        self.layers.push(layer);
        self
    }
}

/// Digests and bytes of one image written to a layout.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The image manifest (with `platform` when listed in an index).
    pub manifest: Descriptor,
    /// The config blob.
    pub config: Descriptor,
    /// The layer blobs, bottom first.
    pub layers: Vec<Descriptor>,
    /// The manifest's bytes as written.
    pub manifest_bytes: Vec<u8>,
    /// The config's bytes as written.
    pub config_bytes: Vec<u8>,
}

impl BuiltImage {
    /// Digests of the layers, bottom first.
    pub fn layer_digests(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.digest.clone()).collect()
    }
}

/// An OCI image layout in a temp dir (deleted on drop) holding one tag.
#[derive(Debug)]
pub struct OciLayout {
    dir: tempfile::TempDir,
    /// The tag (`org.opencontainers.image.ref.name`) in `index.json`.
    pub tag: String,
    /// What the tag points at: the image manifest, or the image index when multi-arch.
    pub top: Descriptor,
    /// The image index, for a multi-arch layout.
    pub index: Option<Descriptor>,
    /// The index's bytes, for a multi-arch layout.
    pub index_bytes: Option<Vec<u8>>,
    /// Every image, in index order.
    pub images: Vec<BuiltImage>,
}

impl OciLayout {
    /// Writes a layout whose `tag` points at one image manifest.
    pub fn single(tag: &str, spec: &ImageSpec) -> anyhow::Result<OciLayout> {
        let dir = new_layout_dir()?;
        let image = write_image(dir.path(), spec, false)?;
        let top = image.manifest.clone();
        write_index_json(dir.path(), tag, &top)?;
        Ok(OciLayout {
            dir,
            tag: tag.to_string(),
            top,
            index: None,
            index_bytes: None,
            images: vec![image],
        })
    }

    /// Writes a layout whose `tag` points at an image index listing one manifest per spec.
    pub fn multi(tag: &str, specs: &[ImageSpec]) -> anyhow::Result<OciLayout> {
        let dir = new_layout_dir()?;
        let images = specs
            .iter()
            .map(|spec| write_image(dir.path(), spec, true))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": images.iter().map(|i| i.manifest.to_json()).collect::<Vec<_>>(),
        });
        let index_bytes = serde_json::to_vec(&index)?;
        let top = write_blob(dir.path(), OCI_INDEX, &index_bytes)?;
        write_index_json(dir.path(), tag, &top)?;
        Ok(OciLayout {
            dir,
            tag: tag.to_string(),
            index: Some(top.clone()),
            top,
            index_bytes: Some(index_bytes),
            images,
        })
    }

    /// The layout directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `oci:DIR:TAG`, the skopeo source reference.
    pub fn oci_ref(&self) -> String {
        format!("oci:{}:{}", self.dir.path().display(), self.tag)
    }

    /// Digest the tag points at (index digest when multi-arch, else manifest digest).
    pub fn digest(&self) -> &str {
        &self.top.digest
    }

    /// The image for this architecture, if any.
    pub fn image(&self, architecture: &str) -> Option<&BuiltImage> {
        self.images.iter().find(|i| {
            i.manifest
                .platform
                .as_ref()
                .is_none_or(|p| p.architecture == architecture)
        })
    }

    /// Path of a blob inside the layout.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        blob_path(self.dir.path(), digest)
    }

    /// Every layer digest of every image (may repeat when images share layers).
    pub fn layer_digests(&self) -> Vec<String> {
        self.images.iter().flat_map(|i| i.layer_digests()).collect()
    }
}

/// The single-arch runnable amd64 busybox image (see [`ImageSpec::busybox_amd64`]).
pub fn single_arch(tag: &str) -> anyhow::Result<OciLayout> {
    OciLayout::single(tag, &ImageSpec::busybox_amd64()?)
}

/// The busybox image with `extra` layers on top (e.g. [`Layer::deterministic`] ones shared
/// with other images, or [`Layer::random`] ones nobody has seen).
pub fn single_arch_with_layers(tag: &str, extra: &[Layer]) -> anyhow::Result<OciLayout> {
    let mut spec = ImageSpec::busybox_amd64()?;
    spec.layers.extend(extra.iter().cloned());
    OciLayout::single(tag, &spec)
}

/// A multi-arch index: the runnable amd64 busybox image and a non-runnable arm64 one.
pub fn multi_arch(tag: &str) -> anyhow::Result<OciLayout> {
    OciLayout::multi(
        tag,
        &[ImageSpec::busybox_amd64()?, ImageSpec::placeholder_arm64()],
    )
}

fn new_layout_dir() -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("regcache-oci-")
        .tempdir()
        .context("tempdir")?;
    fs::write(
        dir.path().join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    fs::create_dir_all(dir.path().join("blobs").join("sha256"))?;
    Ok(dir)
}

fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    let (alg, hex) = digest.split_once(':').unwrap_or(("sha256", digest));
    dir.join("blobs").join(alg).join(hex)
}

fn write_blob(dir: &Path, media_type: &str, data: &[u8]) -> anyhow::Result<Descriptor> {
    let desc = Descriptor::of(media_type, data);
    let path = blob_path(dir, &desc.digest);
    if !path.exists() {
        fs::write(&path, data).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(desc)
}

fn write_image(dir: &Path, spec: &ImageSpec, with_platform: bool) -> anyhow::Result<BuiltImage> {
    let mut layers = Vec::new();
    for layer in &spec.layers {
        layers.push(write_blob(dir, OCI_LAYER_GZIP, &layer.blob)?);
    }
    let mut config = serde_json::json!({
        "created": CREATED,
        "architecture": spec.platform.architecture,
        "os": spec.platform.os,
        "config": {"Env": spec.env, "Cmd": spec.cmd},
        "rootfs": {
            "type": "layers",
            "diff_ids": spec.layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
        "history": spec.layers.iter().map(|_| serde_json::json!({
            "created": CREATED,
            "created_by": "regcache e2e test support",
        })).collect::<Vec<_>>(),
    });
    if let Some(variant) = &spec.platform.variant {
        config["variant"] = serde_json::Value::String(variant.clone());
    }
    let config_bytes = serde_json::to_vec(&config)?;
    let config_desc = write_blob(dir, OCI_CONFIG, &config_bytes)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_desc.to_json(),
        "layers": layers.iter().map(Descriptor::to_json).collect::<Vec<_>>(),
    });
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let mut manifest_desc = write_blob(dir, OCI_MANIFEST, &manifest_bytes)?;
    if with_platform {
        manifest_desc.platform = Some(spec.platform.clone());
    }
    Ok(BuiltImage {
        manifest: manifest_desc,
        config: config_desc,
        layers,
        manifest_bytes,
        config_bytes,
    })
}

fn write_index_json(dir: &Path, tag: &str, top: &Descriptor) -> anyhow::Result<()> {
    let mut entry = top.to_json();
    entry["annotations"] = serde_json::json!({ REF_NAME: tag });
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [entry],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec_pretty(&index)?)?;
    Ok(())
}

/// Time limit for one skopeo command.
const SKOPEO_LIMIT: Duration = Duration::from_secs(120);

/// A `skopeo --insecure-policy` command with a private empty auth file and registries.conf
/// (kept alive by the returned temp dir) and [`no_egress_env`].
pub fn skopeo_cmd() -> anyhow::Result<(tokio::process::Command, tempfile::TempDir)> {
    if super::peers::which("skopeo").is_none() {
        bail!("`skopeo` not found on PATH: install Debian package skopeo");
    }
    let dir = tempfile::Builder::new()
        .prefix("regcache-skopeo-")
        .tempdir()
        .context("tempdir")?;
    let auth = dir.path().join("auth.json");
    fs::write(&auth, br#"{"auths":{}}"#)?;
    let registries = dir.path().join("registries.conf");
    fs::write(&registries, "unqualified-search-registries = []\n")?;
    let mut cmd = tokio::process::Command::new("skopeo");
    cmd.arg("--insecure-policy")
        .arg("--tmpdir")
        .arg(dir.path())
        .env("REGISTRY_AUTH_FILE", &auth)
        .env("CONTAINERS_REGISTRIES_CONF", &registries)
        .envs(no_egress_env());
    Ok((cmd, dir))
}

fn docker_ref(reference: &str) -> String {
    if reference.starts_with("docker://") {
        reference.to_string()
    } else {
        format!("docker://{reference}")
    }
}

/// Pushes the layout's tag to `dest` (`127.0.0.1:PORT/name:tag`, `docker://` optional) over
/// plain HTTP with `skopeo copy --all --preserve-digests`, with `--dest-creds user:password`
/// when `creds` is given. Returns the digest skopeo reports (equals `layout.digest()`).
pub async fn push(
    layout: &OciLayout,
    dest: &str,
    creds: Option<(&str, &str)>,
) -> anyhow::Result<String> {
    push_with(layout, dest, creds, &[]).await
}

/// [`push`] with extra `skopeo copy` arguments (e.g. `["--format", "v2s2"]`, which changes
/// digests and so drops `--preserve-digests`).
pub async fn push_with(
    layout: &OciLayout,
    dest: &str,
    creds: Option<(&str, &str)>,
    extra_args: &[&str],
) -> anyhow::Result<String> {
    let (mut cmd, tmp) = skopeo_cmd()?;
    let digestfile = tmp.path().join("digest");
    cmd.args([
        "copy",
        "--all",
        "--dest-tls-verify=false",
        "--retry-times",
        "0",
    ]);
    if !extra_args.iter().any(|a| *a == "--format" || *a == "-f") {
        cmd.arg("--preserve-digests");
    }
    cmd.arg("--digestfile").arg(&digestfile);
    if let Some((user, password)) = creds {
        cmd.arg("--dest-creds").arg(format!("{user}:{password}"));
    }
    cmd.args(extra_args)
        .arg(layout.oci_ref())
        .arg(docker_ref(dest));
    run_ok(&mut cmd, SKOPEO_LIMIT)
        .await
        .with_context(|| format!("skopeo push to {dest}"))?;
    let digest = fs::read_to_string(&digestfile)
        .context("skopeo --digestfile")?
        .trim()
        .to_string();
    Ok(digest)
}

/// Digests listed in an OCI layout's `index.json`, in order.
pub fn layout_index_digests(dir: &Path) -> anyhow::Result<Vec<String>> {
    let index: serde_json::Value = serde_json::from_slice(
        &fs::read(dir.join("index.json"))
            .with_context(|| format!("read {}/index.json", dir.display()))?,
    )?;
    Ok(index["manifests"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|d| d["digest"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// Pulls `src_ref` (`127.0.0.1:PORT/name:tag` or `@sha256:…`, `docker://` optional) into a
/// fresh OCI layout at `dest_dir` with `skopeo copy --src-tls-verify=false EXTRA…`
/// (e.g. `--all`, `--src-creds u:p`, `--override-arch arm64`). Returns the digests in the
/// pulled layout's `index.json`: the manifest digest, or the index digest with `--all`.
pub async fn skopeo_pull(
    src_ref: &str,
    dest_dir: &Path,
    extra_args: &[&str],
) -> anyhow::Result<Vec<String>> {
    let (mut cmd, _tmp) = skopeo_cmd()?;
    cmd.args(["copy", "--src-tls-verify=false", "--retry-times", "0"])
        .args(extra_args)
        .arg(docker_ref(src_ref))
        .arg(format!("oci:{}", dest_dir.display()));
    run_ok(&mut cmd, SKOPEO_LIMIT)
        .await
        .with_context(|| format!("skopeo pull of {src_ref}"))?;
    layout_index_digests(dest_dir)
}

/// The raw manifest (or index) bytes served for `reference`
/// (`skopeo inspect --raw --tls-verify=false EXTRA… docker://REF`; `--creds u:p` in EXTRA).
pub async fn skopeo_inspect_raw(reference: &str, extra_args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let (mut cmd, _tmp) = skopeo_cmd()?;
    cmd.args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        "--retry-times",
        "0",
    ])
    .args(extra_args)
    .arg(docker_ref(reference));
    let shown = format!("{:?}", cmd.as_std());
    let out = run(&mut cmd, SKOPEO_LIMIT).await?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// Digest of what the registry serves for `reference` (sha256 of the raw manifest bytes).
pub async fn skopeo_inspect_digest(reference: &str, extra_args: &[&str]) -> anyhow::Result<String> {
    Ok(sha256_digest(
        &skopeo_inspect_raw(reference, extra_args).await?,
    ))
}
