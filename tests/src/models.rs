//! Real ONNX models for tests and benchmarks, fetched from PyPI with pip on first use, cached
//! under `target/models/`, and checked against pinned SHA-256 digests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// A model file inside a PyPI wheel.
#[derive(Debug, Clone, Copy)]
pub struct WheelModel {
    pub package: &'static str,
    pub version: &'static str,
    /// Path of the file inside the wheel.
    pub member: &'static str,
    pub sha256: &'static str,
}

/// Silero VAD (MIT), the stateful 16 kHz variant tract runs: `input f32[1,576]`,
/// `state f32[2,1,128]` → `output f32[1,1]`, `stateN f32[2,1,128]`.
pub const SILERO_VAD_16K: WheelModel = WheelModel {
    package: "silero-vad",
    version: "6.2.3",
    member: "silero_vad/data/silero_vad_openvino_16k.onnx",
    sha256: "7776b81ad1b0350c15d7f1555943b9232eb53e9ca5d989c6d0cea9ebc8664d87",
};

/// Silero VAD's default export, which uses ONNX `If` (tract cannot run it): a negative fixture.
pub const SILERO_VAD_WITH_IF: WheelModel = WheelModel {
    package: "silero-vad",
    version: "6.2.3",
    member: "silero_vad/data/silero_vad.onnx",
    sha256: "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
};

/// The PP-OCR mobile text-direction classifier (Apache-2.0): `x f32[?,3,?,?]` →
/// `save_infer_model/scale_0.tmp_1 f32[?,2]`; run at `[1,3,48,192]`.
pub const PPOCR_CLS: WheelModel = WheelModel {
    package: "rapidocr-onnxruntime",
    version: "1.4.4",
    member: "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    sha256: "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
};

/// A fixture model committed in `agent/tests/models/`.
pub fn fixture(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../agent/tests/models")
        .join(name);
    assert!(path.exists(), "fixture {} is missing", path.display());
    path
}

static FETCH: Mutex<()> = Mutex::new(());

fn sha256_of(path: &Path) -> Option<String> {
    std::fs::read(path)
        .ok()
        .map(|bytes| hex::encode(Sha256::digest(bytes)))
}

/// Returns the cached model file, fetching the wheel with `pip download` if needed.
pub fn fetch(model: WheelModel) -> PathBuf {
    let _guard = FETCH
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let cache = crate::target_dir()
        .parent()
        .expect("target dir has a parent")
        .join("models");
    let file_name = Path::new(model.member)
        .file_name()
        .expect("member has a file name");
    let path = cache
        .join(format!("{}-{}", model.package, model.version))
        .join(file_name);
    if sha256_of(&path).as_deref() == Some(model.sha256) {
        return path;
    }
    std::fs::create_dir_all(path.parent().expect("has a parent")).expect("create target/models");
    let download = tempfile::tempdir().expect("temp dir");
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(download.path())
        .arg(format!("{}=={}", model.package, model.version))
        .status()
        .expect("python3 -m pip must be installed to fetch test models");
    assert!(
        status.success(),
        "pip download {}=={} failed",
        model.package,
        model.version
    );
    let wheel = std::fs::read_dir(download.path())
        .expect("read download dir")
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .expect("pip downloaded a wheel");
    let tmp = path.with_extension("part");
    let script = "import sys, zipfile; open(sys.argv[3], 'wb').write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))";
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(&wheel)
        .arg(model.member)
        .arg(&tmp)
        .status()
        .expect("python3 runs");
    assert!(
        status.success(),
        "cannot extract {} from {}",
        model.member,
        wheel.display()
    );
    let got = sha256_of(&tmp).unwrap_or_default();
    assert_eq!(
        got, model.sha256,
        "{} from {} {} has an unexpected sha256",
        model.member, model.package, model.version
    );
    std::fs::rename(&tmp, &path).expect("move model into the cache");
    path
}
