//! wukong-operator's container image (scripts/build-image.sh): built twice, into two directories with their own
//! buildah storage, it has one digest; it is what deploy/operator.yaml runs (the reference in the archive is the
//! Deployment's image), holds nothing but the static binary (one layer, one file: no shell, no package manager,
//! no libc), runs it as 65532 with the OCI labels of this commit, and the binary starts in that root filesystem
//! with nothing else in it.

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use wukong_e2e::workspace_root;

/// Runs `program` with `args`; its stdout, or an error with its stderr.
fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program).args(args).current_dir(workspace_root()).output()?;
    ensure!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// Builds the image into `out`; the archive's path, as the script prints it.
fn build(out: &Path) -> Result<PathBuf> {
    let archive = wukong_e2e::operator_lab::build_operator_image(Some(out))?;
    ensure!(archive.starts_with(out) && archive.exists(), "build-image.sh printed {}", archive.display());
    Ok(archive)
}

fn inspect(archive: &Path, extra: &[&str]) -> Result<Value> {
    let reference = format!("oci-archive:{}", archive.display());
    let args: Vec<&str> = ["inspect"].iter().chain(extra).chain([&reference.as_str()]).copied().collect();
    Ok(serde_json::from_str(&run("skopeo", &args)?)?)
}

#[test]
fn the_operator_image_is_reproducible_minimal_non_root_and_the_one_the_deployment_runs() -> Result<()> {
    let (first, second) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let archive = build(first.path())?;
    let again = build(second.path())?;
    let digest = |archive: &Path| inspect(archive, &[]).map(|i| i["Digest"].as_str().unwrap_or_default().to_string());
    let (one, two) = (digest(&archive)?, digest(&again)?);
    assert!(one.starts_with("sha256:"), "{one}");
    assert_eq!(one, two, "two builds of one commit, two digests");

    // The reference the archive names the image by is the one the shipped Deployment runs.
    let index: Value = serde_json::from_str(&run("tar", &["-xOf", archive.to_str().unwrap(), "index.json"])?)?;
    let named = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"].as_str().unwrap_or_default();
    let manifests = std::fs::read_to_string(workspace_root().join("deploy/operator.yaml"))?;
    let deployment = serde_saphyr::from_multiple::<Value>(&manifests)?
        .into_iter()
        .find(|d| d["kind"] == "Deployment")
        .context("deploy/operator.yaml has no Deployment")?;
    let image = &deployment["spec"]["template"]["spec"]["containers"][0]["image"];
    assert_eq!(image, named, "deploy/operator.yaml runs {image}, the archive holds {named}");
    let version = env!("CARGO_PKG_VERSION");
    assert!(named.ends_with(&format!("/wukong-operator:{version}")), "{named}");

    // Runs as 65532, the binary as entrypoint, labelled with this commit.
    let config = inspect(&archive, &["--config"])?;
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(config["config"]["Entrypoint"], serde_json::json!(["/wukong-operator"]));
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["run"]));
    let revision = run("git", &["rev-parse", "HEAD"])?.trim().to_string();
    let epoch = run("git", &["log", "-1", "--format=%ct"])?.trim().to_string();
    let created = run("date", &["-u", "-d", &format!("@{epoch}"), "+%Y-%m-%dT%H:%M:%SZ"])?.trim().to_string();
    let labels = &config["config"]["Labels"];
    for (label, value) in [
        ("title", "wukong-operator"),
        ("source", "https://github.com/wukong-disk-agent/wukong"),
        ("version", version),
        ("revision", revision.as_str()),
        ("licenses", "Apache-2.0"),
        ("created", created.as_str()),
    ] {
        assert_eq!(labels[format!("org.opencontainers.image.{label}")], value, "label {label}: {labels}");
    }
    assert!(labels["org.opencontainers.image.description"].as_str().is_some_and(|d| !d.is_empty()), "{labels}");
    assert_eq!(config["created"], created, "the image's creation time is the commit's");

    // One layer with one file: the binary, owned by root and not writable by the user it runs as.
    let layout = tempfile::tempdir()?;
    let oci = format!("oci:{}:image", layout.path().join("layout").display());
    run("skopeo", &["copy", "--quiet", &format!("oci-archive:{}", archive.display()), &oci])?;
    let manifest = inspect(&archive, &["--raw"])?;
    let layers = manifest["layers"].as_array().context("layers")?;
    assert_eq!(layers.len(), 1, "{manifest}");
    let blob = layers[0]["digest"].as_str().unwrap_or_default().replace(':', "/");
    let blob = layout.path().join("layout/blobs").join(blob);
    let listing = run("tar", &["-tvzf", blob.to_str().unwrap()])?;
    let entries: Vec<Vec<&str>> = listing.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(entries.len(), 1, "the layer holds more than the binary: {listing}");
    let (mode, owner, name) = (entries[0][0], entries[0][1], entries[0][5]);
    assert_eq!((mode, owner, name.trim_start_matches("./")), ("-r-xr-xr-x", "0/0", "wukong-operator"), "{listing}");

    // The root filesystem as a runtime unpacks it: no shell, and the binary runs there as 65532 with no libc.
    let bundle = layout.path().join("bundle");
    run(
        "umoci",
        &["unpack", "--image", &format!("{}:image", layout.path().join("layout").display()), bundle.to_str().unwrap()],
    )?;
    let rootfs = bundle.join("rootfs");
    assert!(!rootfs.join("bin/sh").exists() && !rootfs.join("bin").exists(), "a shell in the image");
    let files = run("find", &[rootfs.to_str().unwrap(), "-mindepth", "1"])?;
    assert_eq!(files.trim(), rootfs.join("wukong-operator").display().to_string(), "{files}");
    let version_line =
        run("chroot", &["--userspec=65532:65532", rootfs.to_str().unwrap(), "/wukong-operator", "--version"])?;
    assert_eq!(version_line.trim(), format!("wukong-operator {version}"));
    Ok(())
}
