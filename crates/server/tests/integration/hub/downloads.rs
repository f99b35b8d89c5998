//! Downloads from the fake hub: the HF cache layout, the fp16 variant, a component repo, the
//! retired runwayml id.

use super::*;

#[test]
fn downloads_only_what_is_needed_into_the_hf_cache_layout() {
    let hub = FakeHub::start();
    let extra: &[(&str, &[u8])] = &[
        ("safety_checker/model.safetensors", b"not needed"),
        ("safety_checker/config.json", b"{}"),
        ("feature_extractor/preprocessor_config.json", b"{}"),
        ("unet/diffusion_pytorch_model.bin", b"pickle"),
        (
            "unet/diffusion_pytorch_model.fp16.safetensors",
            b"half weights",
        ),
        ("v1-5-pruned-emaonly.ckpt", b"pickle"),
        ("README.md", b"hi"),
    ];
    let commit = hub.add_repo("test/tiny-a", &fixtures().join("tiny-a"), extra);
    let cache = Scratch::new("layout");
    let seen = Mutex::new(Vec::new());
    let record = |p: &Progress| seen.lock().unwrap().push(p.clone());
    let m = hub::resolve_model("test/tiny-a", &opts(&hub, &cache.0), &record).unwrap();

    let repo_dir = cache.0.join("models--test--tiny-a");
    assert_eq!(m.dir, repo_dir.join("snapshots").join(&commit));
    assert_eq!(m.model_version, format!("test/tiny-a@{commit}"));
    assert_eq!(
        m.source,
        ModelSource::Hub {
            repo: "test/tiny-a".into(),
            commit: commit.clone()
        }
    );
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        commit
    );
    assert_snapshot_is_tiny_a(&m.dir);
    // LFS files are stored under their sha256 and linked relatively from the snapshot.
    let unet = std::fs::read(fixtures().join("tiny-a").join(UNET)).unwrap();
    let sha = hex(&Sha256::digest(&unet));
    assert!(repo_dir.join("blobs").join(&sha).is_file());
    let link = std::fs::read_link(m.dir.join(UNET)).unwrap();
    assert_eq!(link, Path::new("../../../blobs").join(&sha));
    no_incomplete(&cache.0);

    // The token goes with every request (the CDN here shares the hub's host).
    assert!(
        hub.log().iter().all(|l| l.contains(" auth")),
        "{:#?}",
        hub.log()
    );
    let log = hub.log().join("\n");
    for unwanted in [
        "safety_checker",
        "feature_extractor",
        ".bin",
        ".ckpt",
        "README",
        "fp16",
    ] {
        assert!(!log.contains(unwanted), "fetched {unwanted}:\n{log}");
    }
    // Progress: a known total, ending complete.
    let seen = seen.lock().unwrap();
    let last_dl = seen
        .iter()
        .rev()
        .find(|p| p.stage == Stage::Downloading)
        .unwrap();
    assert_eq!(Some(last_dl.bytes_done), last_dl.bytes_total);
    assert_eq!(last_dl.files_done, last_dl.files_total);
    assert_eq!(seen.last().unwrap().stage, Stage::Done);

    // A second resolve finds everything linked: only the revision API is asked.
    let before = hub.log().len();
    let again = hub::resolve_model("test/tiny-a", &opts(&hub, &cache.0), &quiet).unwrap();
    assert_eq!(again.dir, m.dir);
    let after = hub.log();
    assert_eq!(after.len() - before, 1, "{:?}", &after[before..]);
    assert!(after[before].starts_with("GET /api/models/test/tiny-a/revision/main"));
}

#[test]
fn half_precision_fetches_the_fp16_variant() {
    let hub = FakeHub::start();
    hub.add_repo(
        "test/tiny-fp16",
        &fixtures().join("tiny-a"),
        &[("unet/diffusion_pytorch_model.fp16.safetensors", b"half")],
    );
    let cache = Scratch::new("fp16");
    let mut o = opts(&hub, &cache.0);
    o.fp16 = true;
    let m = hub::resolve_model("test/tiny-fp16", &o, &quiet).unwrap();
    assert_eq!(
        std::fs::read(m.dir.join("unet/diffusion_pytorch_model.fp16.safetensors")).unwrap(),
        b"half"
    );
    assert!(!m.dir.join(UNET).exists(), "the fp32 UNet was fetched too");
    // Components without a variant fall back to their plain weights.
    assert!(m.dir.join(VAE).is_file());
}

/// A one-model repo (the TAESD preview decoder's shape): its config and the weights of the
/// chosen precision, nothing else; a pipeline repo is refused under this layout.
#[test]
fn a_component_repo_fetches_its_config_and_weights() {
    let hub = FakeHub::start();
    let taesd = fixtures().join("taesd/taesd-a");
    hub.add_repo("test/taesd", &taesd, &[("taesd_decoder.pth", b"pickle")]);
    hub.add_repo("test/tiny-a", &fixtures().join("tiny-a"), &[]);
    let cache = Scratch::new("component");
    let mut o = opts(&hub, &cache.0);
    o.layout = hub::Layout::Component;
    let m = hub::resolve_model("test/taesd", &o, &quiet).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        assert!(
            std::fs::read(m.dir.join(f)).unwrap() == std::fs::read(taesd.join(f)).unwrap(),
            "{f} differs"
        );
    }
    assert!(!m
        .dir
        .join("diffusion_pytorch_model.fp16.safetensors")
        .exists());
    assert!(!m.dir.join("taesd_decoder.pth").exists());
    o.fp16 = true;
    let h = hub::resolve_model("test/taesd", &o, &quiet).unwrap();
    assert!(h
        .dir
        .join("diffusion_pytorch_model.fp16.safetensors")
        .is_file());

    let err = hub::resolve_model("test/tiny-a", &o, &quiet)
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
    // A local folder is checked for the same shape.
    let err = hub::resolve_model(fixtures().join("tiny-a").to_str().unwrap(), &o, &quiet)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no config.json"), "{err}");
    let local = hub::resolve_model(taesd.to_str().unwrap(), &o, &quiet).unwrap();
    assert_eq!(local.dir, taesd);

    // `sdserve download --taesd` fetches it ahead (for offline serving); without the flag the
    // repo is refused as a pipeline.
    let cli_cache = Scratch::new("component-cli");
    let download = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sdserve"))
            .arg("download")
            .args(extra)
            .arg("test/taesd")
            .env_clear()
            .env("HF_ENDPOINT", &hub.url)
            .env("MODEL_CACHE_DIR", &cli_cache.0)
            .output()
            .unwrap()
    };
    let out = download(&["--taesd"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (version, dir) = stdout.trim().split_once('\t').unwrap();
    assert!(version.starts_with("test/taesd@"), "{stdout}");
    assert!(Path::new(dir)
        .join("diffusion_pytorch_model.safetensors")
        .is_file());
    let out = download(&[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("model_index.json"));
}

/// A repo whose components hold only PyTorch pickle `.bin` weights (an older diffusers save):
/// their `.bin` files (the text encoder's shards and index) are fetched, nothing else, and the
/// snapshot loads (through the safe pickle reader). A TAESD repo of pickles gets its `.bin`, or
/// its `.fp16.bin` variant for half precision.
#[test]
fn a_repo_of_pickle_weights_fetches_its_bin_files_and_loads() {
    let hub = FakeHub::start();
    let bin = fixtures().join("tiny-inpaint-bin");
    hub.add_repo(
        "test/pickles",
        &bin,
        &[
            ("unet/diffusion_pytorch_model.non_ema.bin", b"other variant"),
            ("safety_checker/pytorch_model.bin", b"not needed"),
            ("safety_checker/config.json", b"{}"),
        ],
    );
    let cache = Scratch::new("pickles");
    let m = hub::resolve_model("test/pickles", &opts(&hub, &cache.0), &quiet).unwrap();
    for f in [
        "unet/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.bin",
        "text_encoder/pytorch_model-00001-of-00002.bin",
        "text_encoder/pytorch_model-00002-of-00002.bin",
        "text_encoder/pytorch_model.bin.index.json",
    ] {
        assert!(
            std::fs::read(m.dir.join(f)).unwrap() == std::fs::read(bin.join(f)).unwrap(),
            "{f} differs"
        );
    }
    let log = hub.log().join("\n");
    assert!(
        !log.contains("non_ema") && !log.contains("safety_checker"),
        "{log}"
    );
    let sd = sdserve_pipeline::pipeline::StableDiffusion::load(
        &m.dir,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    );
    assert!(sd.is_ok(), "{:?}", sd.err());

    let taesd = fixtures().join("taesd/taesd-a-bin");
    hub.add_repo("test/taesd-pickles", &taesd, &[]);
    let mut o = opts(&hub, &cache.0);
    o.layout = hub::Layout::Component;
    for (fp16, want) in [
        (false, "diffusion_pytorch_model.bin"),
        (true, "diffusion_pytorch_model.fp16.bin"),
    ] {
        o.fp16 = fp16;
        let t = hub::resolve_model("test/taesd-pickles", &o, &quiet).unwrap();
        assert!(t.dir.join(want).is_file(), "fp16 {fp16}");
        if !fp16 {
            assert!(!t.dir.join("diffusion_pytorch_model.fp16.bin").exists());
        }
        let dtype = if fp16 {
            candle_core::DType::F16
        } else {
            candle_core::DType::F32
        };
        let loaded =
            sdserve_pipeline::taesd::Taesd::load(&t.dir, &candle_core::Device::Cpu, dtype).unwrap();
        assert!(loaded.files()[0].ends_with(want));
    }
}

#[test]
fn the_retired_runwayml_id_maps_to_the_maintained_copy() {
    let hub = FakeHub::start();
    let commit = hub.add_repo(hub::DEFAULT_MODEL, &fixtures().join("tiny-a"), &[]);
    let cache = Scratch::new("alias");
    let m = hub::resolve_model(
        "runwayml/stable-diffusion-v1-5",
        &opts(&hub, &cache.0),
        &quiet,
    )
    .unwrap();
    assert_eq!(m.model_version, format!("{}@{commit}", hub::DEFAULT_MODEL));
    assert!(!hub.log().join("\n").contains("runwayml"));
}

/// A list of files (the ControlNet preprocessors' weights of `lllyasviel/Annotators`): those
/// and nothing else, found again from the cache by revision; a file the repo lacks is named.
/// `sdserve download --annotators` fetches the server's own list from each of its repos, and
/// names what a repo lacks.
#[test]
fn a_file_list_fetches_those_files_and_the_cache_finds_them() {
    let hub = FakeHub::start();
    let empty = Scratch::new("files-repo");
    std::fs::create_dir_all(&empty.0).unwrap();
    let commit = hub.add_repo(
        "test/annotators",
        &empty.0,
        &[
            ("ControlNetHED.pth", b"hed weights"),
            ("table5_pidinet.pth", b"pidinet weights"),
            ("body_pose_model.pth", b"not asked for"),
        ],
    );
    let cache = Scratch::new("files");
    let mut o = opts(&hub, &cache.0);
    assert_eq!(
        hub::cached_snapshot(&cache.0, "test/annotators", "main"),
        None
    );
    o.layout = hub::Layout::Files(&["ControlNetHED.pth", "table5_pidinet.pth"]);
    let m = hub::resolve_model("test/annotators", &o, &quiet).unwrap();
    assert_eq!(m.model_version, format!("test/annotators@{commit}"));
    assert_eq!(
        std::fs::read(m.dir.join("ControlNetHED.pth")).unwrap(),
        b"hed weights"
    );
    assert!(m.dir.join("table5_pidinet.pth").is_file());
    assert!(!m.dir.join("body_pose_model.pth").exists());
    assert_eq!(
        hub::cached_snapshot(&cache.0, "test/annotators", "main"),
        Some(m.dir.clone())
    );
    no_incomplete(&cache.0);

    o.layout = hub::Layout::Files(&["ControlNetHED.pth", "sk_model.pth"]);
    let err = hub::resolve_model("test/annotators", &o, &quiet)
        .unwrap_err()
        .to_string();
    assert!(err.contains("lacks sk_model.pth"), "{err}");

    // The command: each repo it resolves (the server's own list, by repo), against repos
    // without the server's files, names each repo's files; with them (any bytes) it fetches
    // them into the cache and prints each repo's snapshot.
    let cli_cache = Scratch::new("files-cli");
    let download = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdserve"))
            .args(["download", "--annotators"])
            .env_clear()
            .env("HF_ENDPOINT", &hub.url)
            .env("MODEL_CACHE_DIR", &cli_cache.0)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        (out, stderr)
    };
    let (out, stderr) = download();
    assert!(!out.status.success());
    let repos: Vec<String> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("resolving "))
        .map(|r| r.trim().to_string())
        .collect();
    assert!(
        repos.contains(&"lllyasviel/Annotators".to_string()) && repos.len() >= 2,
        "{stderr}"
    );
    for repo in &repos {
        hub.add_repo(repo, &empty.0, &[]);
    }
    let (out, stderr) = download();
    assert!(!out.status.success());
    // `error: <repo>@<commit>: the repo lacks <file>, <file>`, one line per repo.
    let wanted: Vec<(String, Vec<String>)> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("error: ")?.split_once(": the repo lacks "))
        .map(|(head, list)| {
            let repo = head.split('@').next().unwrap().to_string();
            (repo, list.trim().split(", ").map(str::to_string).collect())
        })
        .collect();
    assert_eq!(wanted.len(), repos.len(), "{stderr}");
    assert!(
        wanted
            .iter()
            .any(|(_, files)| files.contains(&"ControlNetHED.pth".to_string())),
        "{stderr}"
    );
    let mut commits = Vec::new();
    for (repo, files) in &wanted {
        let files: Vec<(&str, &[u8])> = files
            .iter()
            .map(|f| (f.as_str(), f.as_bytes()))
            .chain([("README.md", &b"not asked for"[..])])
            .collect();
        commits.push(hub.add_repo(repo, &empty.0, &files));
    }
    let (out, stderr) = download();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{stderr}");
    let printed: Vec<&str> = stdout.lines().collect();
    assert_eq!(printed.len(), wanted.len(), "{stdout}");
    for (((repo, files), commit), line) in wanted.iter().zip(&commits).zip(printed) {
        let (version, dir) = line.trim().split_once('\t').unwrap();
        assert_eq!(version, format!("{repo}@{commit}"));
        for f in files {
            assert_eq!(std::fs::read(Path::new(dir).join(f)).unwrap(), f.as_bytes());
        }
        assert!(!Path::new(dir).join("README.md").exists());
        assert_eq!(
            hub::cached_snapshot(&cli_cache.0, repo, "main").as_deref(),
            Some(Path::new(dir))
        );
    }
}
