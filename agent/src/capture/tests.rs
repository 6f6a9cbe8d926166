//! Batches close at their limits, survive a crash, are numbered once, and leave the disk only
//! after an upload or a refusal.

use edgefleet_protocol::capture::{CapturedFeedback, CapturedSample, Truth};
use edgefleet_protocol::manifest::{NamedTensor, TensorData};
use edgefleet_protocol::{ModelName, ModelVersion, TensorName};

use super::*;

fn model(tag: &[u8]) -> ModelRef {
    ModelRef {
        name: ModelName::new("pump").unwrap(),
        version: ModelVersion::new("1.0").unwrap(),
        release: 1,
        manifest_digest: Sha256Digest::of(tag),
    }
}

fn sample(prediction: u64) -> CaptureRecord {
    CaptureRecord::Sample(CapturedSample {
        prediction,
        at: Timestamp(1000 + prediction),
        inputs: vec![NamedTensor {
            name: TensorName::new("x").unwrap(),
            shape: vec![1, 4],
            data: TensorData::F32(vec![prediction as f32, 1.0, 2.0, 3.0]),
        }],
        outputs: Vec::new(),
    })
}

fn settings(max_batch_samples: u32) -> CaptureSettings {
    CaptureSettings {
        rate_ppm: 1_000_000,
        max_batch_samples,
        max_batch_age_s: 60,
        outputs: false,
        feedback: true,
    }
}

fn store(dir: &Path, max_bytes: u64) -> CaptureStore {
    CaptureStore::open(dir, DeviceId::new("d1").unwrap(), max_bytes).unwrap()
}

fn batch_file(dir: &Path, notice: &CaptureNotice) -> CaptureBatch {
    let bytes = fs::read(dir.join(format!("{:020}.batch.cbor", notice.batch))).unwrap();
    assert_eq!(Sha256Digest::of(&bytes), notice.sha256);
    assert_eq!(bytes.len() as u64, notice.bytes);
    CaptureBatch::decode(&bytes).unwrap()
}

#[test]
fn a_batch_closes_at_its_sample_count_and_matches_its_notice() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(dir.path(), 1 << 20);
    let m = model(b"a");
    assert_eq!(
        s.append(&m, &sample(1), Timestamp(0)).unwrap(),
        Appended::Off
    );
    assert!(s.set_settings(Some(settings(2))).unwrap());
    assert!(!s.set_settings(Some(settings(2))).unwrap(), "unchanged");
    let feedback = CaptureRecord::Feedback(CapturedFeedback {
        prediction: 1,
        at: Timestamp(1500),
        truth: Truth::Label(1),
    });
    for record in [sample(1), feedback.clone(), sample(2)] {
        assert_eq!(
            s.append(&m, &record, Timestamp(0)).unwrap(),
            Appended::Stored
        );
    }
    let notices = s.due_notices(Instant::now(), Duration::from_secs(300));
    assert_eq!(notices.len(), 1);
    let notice = &notices[0];
    assert_eq!((notice.batch, notice.samples), (1, 2));
    assert_eq!(
        (notice.first_at, notice.last_at),
        (Timestamp(1001), Timestamp(1500))
    );
    let batch = batch_file(dir.path(), notice);
    assert_eq!(batch.records, vec![sample(1), feedback, sample(2)]);
    assert_eq!(batch.model, m);
    assert!(
        s.due_notices(Instant::now(), Duration::from_secs(300))
            .is_empty(),
        "announced once until the interval passes"
    );
}

#[test]
fn a_model_change_or_the_age_limit_closes_the_open_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(dir.path(), 1 << 20);
    s.set_settings(Some(settings(100))).unwrap();
    s.append(&model(b"a"), &sample(1), Timestamp(0)).unwrap();
    s.append(&model(b"b"), &sample(2), Timestamp(0)).unwrap();
    assert_eq!(s.pending(), 1, "model a's batch closed");
    s.tick(Timestamp(59_999)).unwrap();
    assert_eq!(s.pending(), 1);
    s.tick(Timestamp(60_000)).unwrap();
    assert_eq!(s.pending(), 2, "model b's batch closed at 60 s");
    let notices = s.due_notices(Instant::now(), Duration::ZERO);
    assert_eq!(batch_file(dir.path(), &notices[1]).model, model(b"b"));
    // Turning capture off closes what is open; later records are not kept.
    s.append(&model(b"b"), &sample(3), Timestamp(0)).unwrap();
    s.set_settings(None).unwrap();
    assert_eq!(s.pending(), 3);
    assert_eq!(
        s.append(&model(b"b"), &sample(4), Timestamp(0)).unwrap(),
        Appended::Off
    );
    assert!(!dir.path().join("settings.json").exists());
}

#[test]
fn a_crash_leaves_a_batch_of_the_records_written_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(dir.path(), 1 << 20);
    s.set_settings(Some(settings(100))).unwrap();
    for i in 1..=3 {
        s.append(&model(b"a"), &sample(i), Timestamp(0)).unwrap();
    }
    drop(s);
    // The last frame was torn by the crash.
    let journal = dir.path().join("open.journal");
    let len = fs::metadata(&journal).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&journal)
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    fs::write(dir.path().join("00000000000000000009.batch.tmp"), b"half").unwrap();
    let mut s = store(dir.path(), 1 << 20);
    assert_eq!(
        s.settings(),
        Some(&settings(100)),
        "settings survive restarts"
    );
    assert!(!journal.exists());
    let notices = s.due_notices(Instant::now(), Duration::ZERO);
    assert_eq!(notices.len(), 1);
    assert_eq!(
        batch_file(dir.path(), &notices[0]).records,
        vec![sample(1), sample(2)]
    );
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        3,
        "settings, counter, batch"
    );
}

#[test]
fn batches_leave_the_disk_after_upload_or_refusal_and_numbers_are_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(dir.path(), 1 << 20);
    s.set_settings(Some(settings(1))).unwrap();
    for i in 1..=3 {
        s.append(&model(b"a"), &sample(i), Timestamp(0)).unwrap();
    }
    let t0 = Instant::now();
    assert_eq!(s.due_notices(t0, Duration::from_secs(300)).len(), 3);
    let url = String::from("https://ctl/api/v1/captures/1");
    let Offer::Upload { path, .. } = s.offer(1, Some(url.clone())).unwrap() else {
        panic!("batch 1 is offered for upload");
    };
    assert!(path.exists());
    assert_eq!(
        s.offer(1, Some(url.clone())).unwrap(),
        Offer::Nothing,
        "already uploading"
    );
    s.uploaded(1, Ok(()), t0).unwrap();
    assert!(!path.exists());
    assert_eq!(s.offer(2, None).unwrap(), Offer::Nothing);
    assert_eq!(s.pending(), 1, "batch 2 refused and deleted");
    assert!(matches!(
        s.offer(3, Some(url.clone())).unwrap(),
        Offer::Upload { .. }
    ));
    s.uploaded(3, Err(UploadError::Retry(String::from("down"))), t0)
        .unwrap();
    assert!(s.due_notices(t0, Duration::from_secs(300)).is_empty());
    let later = t0 + Duration::from_secs(300);
    assert_eq!(s.due_notices(later, Duration::from_secs(300))[0].batch, 3);
    s.uploaded(3, Ok(()), later).unwrap();
    drop(s);
    let mut s = store(dir.path(), 1 << 20);
    s.append(&model(b"a"), &sample(9), Timestamp(0)).unwrap();
    assert_eq!(s.due_notices(later, Duration::ZERO)[0].batch, 4);
}

#[test]
fn past_the_disk_bound_new_records_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let one = codec::encode(&sample(1)).len() as u64 + 4;
    let header = codec::encode(&model(b"a")).len() as u64 + 4;
    let mut s = store(dir.path(), header + 2 * one + one / 2);
    s.set_settings(Some(settings(100))).unwrap();
    assert_eq!(
        s.append(&model(b"a"), &sample(1), Timestamp(0)).unwrap(),
        Appended::Stored
    );
    assert_eq!(
        s.append(&model(b"a"), &sample(2), Timestamp(0)).unwrap(),
        Appended::Stored
    );
    assert!(matches!(
        s.append(&model(b"a"), &sample(3), Timestamp(0)).unwrap(),
        Appended::Dropped(reason) if reason.contains("capture.max_bytes")
    ));
    assert_eq!(s.dropped(), 1);
    let big = CaptureRecord::Sample(CapturedSample {
        prediction: 1,
        at: Timestamp(0),
        inputs: vec![NamedTensor {
            name: TensorName::new("x").unwrap(),
            shape: vec![1, 5_000_000],
            data: TensorData::F32(vec![0.1; 5_000_000]),
        }],
        outputs: Vec::new(),
    });
    assert!(matches!(
        s.append(&model(b"a"), &big, Timestamp(0)).unwrap(),
        Appended::Dropped(reason) if reason.contains("batch limit")
    ));
}
