//! The dry-run sink: writes exactly what a live run would send, as files, and nothing else.
//!
//! Outputs in the chosen folder: `<ResourceType>.ndjson` (one resource per line, the bulk-data
//! convention), `crid-requests.ndjson` (the `PUT /CRID` bodies: personal data), optional
//! `bundles/bundle-NNNNN.json` transaction Bundles of at most [`BUNDLE_MAX`] entries, and, written
//! by [`write_manifest`] at the very end, `manifest.json`. Every file is created with mode 0600.
//! This sink never builds an HTTP client and never calls the CRID service.
//!
//! The Bundles are packed as the loader packs them for patients the server does not hold yet: a
//! patient with fewer than [`BUNDLE_MAX`] resources travels with them in one Bundle (they refer to
//! it by its placeholder, which is the Patient entry's `fullUrl`), several such patients share a
//! Bundle, and a patient with more goes on its own while its resources fill Bundles of their own.
//! They are written at the end, from the NDJSON files: only each resource's place in its file is
//! kept until then (32 bytes per resource).

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::report::{create_private, sha256_file};
use crate::resource::{MappedPatient, MappedResource};

use super::{RowOutcome, Sink, SinkError};

/// Entries per transaction Bundle: the target refuses more than 50.
pub const BUNDLE_MAX: usize = 50;
/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The CRID requests file's name.
pub const CRID_REQUESTS: &str = "crid-requests.ndjson";

/// Files that hold direct identifiers, which the FHIR resources leave out (names, SSN, raw cells).
const IDENTIFYING_FILES: [&str; 2] = [CRID_REQUESTS, "rejects.csv"];

#[derive(Clone, Debug)]
pub struct DryRunOptions {
    /// The center number, for the CRID request bodies.
    pub ccn: String,
    /// Also write transaction Bundles.
    pub bundles: bool,
}

type FileWriter = std::io::BufWriter<std::fs::File>;

/// One NDJSON file being written, and how many bytes it holds so far.
struct NdjsonFile {
    writer: FileWriter,
    len: u64,
}

/// A written resource, as a Bundle entry will need it: its file (an index into
/// [`BundlePlan::types`]), its line's place in the file and the UUID of its `fullUrl`. 32 bytes.
struct Placed {
    offset: u64,
    len: u32,
    type_index: u32,
    full_url: uuid::Uuid,
}

/// What the Bundles will hold, gathered while the NDJSON files are written.
#[derive(Default)]
struct BundlePlan {
    /// The resource types seen, in the order seen.
    types: Vec<String>,
    /// Patients in the order written, with their keys.
    patients: Vec<(String, Placed)>,
    /// Other resources per patient key, in the order written.
    resources: HashMap<String, Vec<Placed>>,
    /// Patient keys in the order their first resource was written.
    resource_keys: Vec<String>,
}

pub struct DryRunSink {
    dir: PathBuf,
    opts: DryRunOptions,
    ndjson: BTreeMap<String, NdjsonFile>,
    crid: Option<FileWriter>,
    plan: BundlePlan,
    bundle_entries: Vec<serde_json::Value>,
    bundles_written: usize,
}

impl DryRunSink {
    /// Prepares the output folder. It must be absent, empty, or a previous dry run's output (it
    /// has a `manifest.json`), whose files are then removed: stale files must not pass for this
    /// run's.
    pub fn create(dir: &Path, opts: DryRunOptions) -> Result<DryRunSink, SinkError> {
        let io = |path: &Path, source| SinkError::Io {
            path: path.to_path_buf(),
            source,
        };
        if dir.exists() {
            let mut entries = std::fs::read_dir(dir).map_err(|e| io(dir, e))?.peekable();
            if entries.peek().is_some() {
                if !dir.join(MANIFEST).is_file() {
                    return Err(io(
                        dir,
                        std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            "the output folder is not empty and holds no previous dry run",
                        ),
                    ));
                }
                clear_previous(dir).map_err(|e| io(dir, e))?;
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        if opts.bundles {
            let b = dir.join("bundles");
            std::fs::create_dir_all(&b).map_err(|e| io(&b, e))?;
        }
        Ok(DryRunSink {
            dir: dir.to_path_buf(),
            opts,
            ndjson: BTreeMap::new(),
            crid: None,
            plan: BundlePlan::default(),
            bundle_entries: Vec::new(),
            bundles_written: 0,
        })
    }

    fn io(&self, name: &str, source: std::io::Error) -> SinkError {
        SinkError::Io {
            path: self.dir.join(name),
            source,
        }
    }

    /// Appends a resource to its type's NDJSON file and returns where its line starts.
    fn write_resource(&mut self, r: &MappedResource) -> Result<(RowOutcome, u64), SinkError> {
        let name = format!("{}.ndjson", r.resource_type);
        if !self.ndjson.contains_key(&r.resource_type) {
            let writer = create_private(&self.dir.join(&name)).map_err(|e| self.io(&name, e))?;
            self.ndjson
                .insert(r.resource_type.clone(), NdjsonFile { writer, len: 0 });
        }
        let mut offset = 0;
        if let Some(f) = self.ndjson.get_mut(&r.resource_type) {
            let text = r.body.as_str().as_bytes();
            f.writer
                .write_all(text)
                .and_then(|_| f.writer.write_all(b"\n"))
                .map_err(|e| SinkError::Io {
                    path: self.dir.join(&name),
                    source: e,
                })?;
            offset = f.len;
            f.len += text.len() as u64 + 1;
        }
        Ok((RowOutcome::written(r), offset))
    }

    fn placed(&mut self, r: &MappedResource, offset: u64, full_url: uuid::Uuid) -> Placed {
        let types = &mut self.plan.types;
        let type_index = match types.iter().position(|t| *t == r.resource_type) {
            Some(i) => i,
            None => {
                types.push(r.resource_type.clone());
                types.len() - 1
            }
        };
        Placed {
            offset,
            // A line longer than 4 GiB cannot be a resource a server accepts; it would fail
            // when read back rather than be cut.
            len: u32::try_from(r.body.as_str().len()).unwrap_or(u32::MAX),
            type_index: type_index as u32,
            full_url,
        }
    }

    /// Writes the Bundles from the finished NDJSON files, packed as described in the module
    /// documentation.
    fn write_bundles(&mut self) -> Result<(), SinkError> {
        let plan = std::mem::take(&mut self.plan);
        let mut files = Reopened {
            types: plan.types,
            open: HashMap::new(),
        };
        let mut resources = plan.resources;
        for (key, patient) in plan.patients {
            let own = resources.remove(&key).unwrap_or_default();
            if own.len() < BUNDLE_MAX {
                if self.bundle_entries.len() + own.len() + 1 > BUNDLE_MAX {
                    self.flush_bundle()?;
                }
                self.push_entry(&mut files, &patient)?;
                for r in &own {
                    self.push_entry(&mut files, r)?;
                }
            } else {
                self.flush_bundle()?;
                self.push_own_bundles(&mut files, &own)?;
            }
        }
        // Resources whose Patient is not in this run: their own Bundles, patient by patient.
        self.flush_bundle()?;
        for key in plan.resource_keys {
            if let Some(own) = resources.remove(&key) {
                self.push_own_bundles(&mut files, &own)?;
            }
        }
        Ok(())
    }

    /// One patient's resources in Bundles of their own.
    fn push_own_bundles(&mut self, files: &mut Reopened, own: &[Placed]) -> Result<(), SinkError> {
        for chunk in own.chunks(BUNDLE_MAX) {
            for r in chunk {
                self.push_entry(files, r)?;
            }
            self.flush_bundle()?;
        }
        Ok(())
    }

    /// Reads a resource back from its NDJSON file into the next Bundle's entries.
    fn push_entry(&mut self, files: &mut Reopened, placed: &Placed) -> Result<(), SinkError> {
        let resource_type = files
            .types
            .get(placed.type_index as usize)
            .cloned()
            .unwrap_or_default();
        let name = format!("{resource_type}.ndjson");
        let err = |e| SinkError::Io {
            path: self.dir.join(&name),
            source: e,
        };
        let f = match files.open.entry(placed.type_index) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(std::fs::File::open(self.dir.join(&name)).map_err(err)?)
            }
        };
        let mut text = vec![0; placed.len as usize];
        f.seek(SeekFrom::Start(placed.offset))
            .and_then(|_| f.read_exact(&mut text))
            .map_err(err)?;
        let resource: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        self.bundle_entries.push(serde_json::json!({
            "fullUrl": format!("urn:uuid:{}", placed.full_url),
            "resource": resource,
            "request": {"method": "POST", "url": resource_type},
        }));
        Ok(())
    }

    fn flush_bundle(&mut self) -> Result<(), SinkError> {
        if self.bundle_entries.is_empty() {
            return Ok(());
        }
        self.bundles_written += 1;
        let name = format!("bundles/bundle-{:05}.json", self.bundles_written);
        let bundle = serde_json::json!({
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": std::mem::take(&mut self.bundle_entries),
        });
        let mut w = create_private(&self.dir.join(&name)).map_err(|e| self.io(&name, e))?;
        serde_json::to_writer_pretty(&mut w, &bundle)
            .map_err(std::io::Error::other)
            .and_then(|_| w.write_all(b"\n"))
            .and_then(|_| w.flush())
            .map_err(|e| self.io(&name, e))
    }
}

/// The NDJSON files read back for the Bundles, by type index.
struct Reopened {
    types: Vec<String>,
    open: HashMap<u32, std::fs::File>,
}

/// The UUID of a non-Patient resource's `fullUrl` in a Bundle, from its business identifier.
fn resource_full_url(r: &MappedResource) -> uuid::Uuid {
    uuid::Uuid::new_v5(
        &crate::resource::FHIRLIFT_NAMESPACE,
        format!(
            "{}:{}|{}",
            r.resource_type, r.identifier.system, r.identifier.value
        )
        .as_bytes(),
    )
}

impl Sink for DryRunSink {
    fn patients(&mut self, batch: Vec<MappedPatient>) -> Result<Vec<RowOutcome>, SinkError> {
        let mut out = Vec::with_capacity(batch.len());
        for p in &batch {
            let (outcome, offset) = self.write_resource(&p.resource)?;
            out.push(outcome);
            if self.opts.bundles {
                let key = p.resource.patient_key.clone();
                let url = crate::resource::patient_uuid(&key);
                let placed = self.placed(&p.resource, offset, url);
                self.plan.patients.push((key, placed));
            }
            if let Some(demographics) = &p.crid_demographics {
                if self.crid.is_none() {
                    let w = create_private(&self.dir.join(CRID_REQUESTS))
                        .map_err(|e| self.io(CRID_REQUESTS, e))?;
                    self.crid = Some(w);
                }
                let body = serde_json::json!({"ccn": self.opts.ccn, "patient": demographics});
                if let Some(w) = self.crid.as_mut() {
                    let res = serde_json::to_writer(&mut *w, &body)
                        .map_err(std::io::Error::other)
                        .and_then(|_| w.write_all(b"\n"));
                    if let Err(e) = res {
                        return Err(self.io(CRID_REQUESTS, e));
                    }
                }
            }
        }
        Ok(out)
    }

    fn resources(&mut self, batch: Vec<MappedResource>) -> Result<Vec<RowOutcome>, SinkError> {
        let mut out = Vec::with_capacity(batch.len());
        for r in &batch {
            let (outcome, offset) = self.write_resource(r)?;
            out.push(outcome);
            if self.opts.bundles {
                let placed = self.placed(r, offset, resource_full_url(r));
                match self.plan.resources.get_mut(&r.patient_key) {
                    Some(list) => list.push(placed),
                    None => {
                        self.plan.resource_keys.push(r.patient_key.clone());
                        self.plan
                            .resources
                            .insert(r.patient_key.clone(), vec![placed]);
                    }
                }
            }
        }
        Ok(out)
    }

    fn finish(mut self: Box<Self>) -> Result<Vec<RowOutcome>, SinkError> {
        let files = std::mem::take(&mut self.ndjson);
        for (t, mut f) in files {
            f.writer
                .flush()
                .map_err(|e| self.io(&format!("{t}.ndjson"), e))?;
        }
        if self.opts.bundles {
            self.write_bundles()?;
        }
        if let Some(mut w) = self.crid.take() {
            w.flush().map_err(|e| self.io(CRID_REQUESTS, e))?;
        }
        Ok(Vec::new())
    }
}

/// One file in the manifest.
#[derive(Clone, Debug, Serialize)]
pub struct ManifestFile {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
    /// Holds direct identifiers (names, SSN, raw source cells). Every file of a dry run holds
    /// patient data (the resources have birth dates, for one); these hold more.
    pub direct_identifiers: bool,
}

/// `manifest.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Manifest {
    pub fhirlift_version: String,
    pub config_sha256: String,
    /// Resources written, per resource type.
    pub counts: BTreeMap<String, u64>,
    pub files: Vec<ManifestFile>,
    pub note: String,
}

/// Writes `manifest.json` over every other file in the folder (sorted by path), after the sink
/// and the report are done.
pub fn write_manifest(
    dir: &Path,
    config_sha256: &str,
    counts: &BTreeMap<String, u64>,
) -> std::io::Result<Manifest> {
    let mut paths = Vec::new();
    collect(dir, dir, &mut paths)?;
    paths.sort();
    let mut files = Vec::new();
    for rel in paths {
        if rel == MANIFEST {
            continue;
        }
        let full = dir.join(&rel);
        files.push(ManifestFile {
            bytes: std::fs::metadata(&full)?.len(),
            sha256: sha256_file(&full)?,
            direct_identifiers: IDENTIFYING_FILES.contains(&rel.as_str()),
            path: rel,
        });
    }
    let manifest = Manifest {
        fhirlift_version: env!("CARGO_PKG_VERSION").to_string(),
        config_sha256: config_sha256.to_string(),
        counts: counts.clone(),
        files,
        note: "Every file here holds patient data and is readable by its owner only (mode 0600); \
               crid-requests.ndjson and rejects.csv also hold names, SSNs and raw source cells."
            .to_string(),
    };
    let mut w = create_private(&dir.join(MANIFEST))?;
    serde_json::to_writer_pretty(&mut w, &manifest)?;
    w.write_all(b"\n")?;
    w.flush()?;
    Ok(manifest)
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(
                rel.components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/"),
            );
        }
    }
    Ok(())
}

/// Removes a previous dry run's files: those its manifest lists, the manifest, and `bundles/`.
fn clear_previous(dir: &Path) -> std::io::Result<()> {
    let text = std::fs::read_to_string(dir.join(MANIFEST))?;
    let old: serde_json::Value = serde_json::from_str(&text).map_err(std::io::Error::other)?;
    if let Some(files) = old.get("files").and_then(|f| f.as_array()) {
        for f in files {
            if let Some(p) = f.get("path").and_then(|p| p.as_str()) {
                // Only plain relative names written by us; never follow `..`.
                if !p.contains("..") && !p.starts_with('/') {
                    let _ = std::fs::remove_file(dir.join(p));
                }
            }
        }
    }
    let bundles = dir.join("bundles");
    if bundles.is_dir() {
        std::fs::remove_dir_all(bundles)?;
    }
    std::fs::remove_file(dir.join(MANIFEST))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::BusinessIdentifier;
    use crate::sink::OutcomeStatus;
    use crate::source::RowLocation;

    fn obs(n: u64) -> MappedResource {
        MappedResource {
            location: RowLocation {
                file: "labs.csv".into(),
                sheet: None,
                row: n + 1,
            },
            mapping: "labs".into(),
            resource_type: "Observation".into(),
            patient_key: "000123".into(),
            identifier: BusinessIdentifier {
                system: "urn:x".into(),
                value: format!("A{n}"),
            },
            body: crate::resource::Body::from_value(
                &serde_json::json!({"resourceType": "Observation", "id": format!("o{n}")}),
            ),
        }
    }

    fn sink_with_bundles(out: &Path) -> DryRunSink {
        DryRunSink::create(
            out,
            DryRunOptions {
                ccn: "12001".into(),
                bundles: true,
            },
        )
        .expect("create")
    }

    #[test]
    fn bundles_hold_at_most_fifty_entries_and_the_manifest_hashes_every_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out");
        let mut sink = Box::new(sink_with_bundles(&out));
        let outcomes = sink.resources((0..120).map(obs).collect()).expect("write");
        assert_eq!(outcomes.len(), 120);
        assert!(outcomes.iter().all(|o| o.status == OutcomeStatus::Written));
        assert!(sink.finish().expect("finish").is_empty());
        let lines = std::fs::read_to_string(out.join("Observation.ndjson")).expect("ndjson");
        assert_eq!(lines.lines().count(), 120);
        let sizes: Vec<usize> = (1..=3)
            .map(|i| {
                let text = std::fs::read_to_string(out.join(format!("bundles/bundle-{i:05}.json")))
                    .expect("bundle");
                let b: serde_json::Value = serde_json::from_str(&text).expect("json");
                b["entry"].as_array().map_or(0, Vec::len)
            })
            .collect();
        assert_eq!(sizes, vec![50, 50, 20]);
        let counts = BTreeMap::from([("Observation".to_string(), 120)]);
        let m = write_manifest(&out, "cafe", &counts).expect("manifest");
        assert_eq!(m.files.len(), 4);
        assert_eq!(m.files[3].path, "bundles/bundle-00003.json");
        // A second dry run into the same folder replaces the first.
        let again = DryRunSink::create(
            &out,
            DryRunOptions {
                ccn: "12001".into(),
                bundles: false,
            },
        );
        assert!(again.is_ok());
        assert!(!out.join("Observation.ndjson").exists());
    }

    fn lab(key: &str, n: u64) -> MappedResource {
        let mut r = obs(n);
        r.patient_key = key.into();
        r.body = crate::resource::Body::from_value(&serde_json::json!({
            "resourceType": "Observation",
            "subject": {"reference": crate::resource::patient_placeholder(key)},
        }));
        r
    }

    fn patient(key: &str) -> MappedPatient {
        let mut r = obs(0);
        r.resource_type = "Patient".into();
        r.patient_key = key.into();
        r.body = crate::resource::Body::from_value(&serde_json::json!({"resourceType": "Patient"}));
        MappedPatient {
            resource: r,
            crid_demographics: None,
            known_crid: None,
        }
    }

    #[test]
    fn bundles_carry_each_new_patient_with_its_resources_as_the_loader_packs_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out");
        let mut sink = Box::new(sink_with_bundles(&out));
        sink.patients(vec![patient("p1"), patient("p2"), patient("p3")])
            .expect("patients");
        // Rows of several patients interleaved, as a lab file holds them; `orphan` has no Patient
        // in this run.
        let mut labs = Vec::new();
        for n in 0..60 {
            labs.push(lab("p2", n));
            if n < 2 {
                labs.push(lab("p1", 100 + n));
            }
            if n < 47 {
                labs.push(lab("p3", 200 + n));
            }
        }
        labs.push(lab("orphan", 300));
        sink.resources(labs).expect("resources");
        sink.finish().expect("finish");

        let mut bundles = Vec::new();
        for i in 1.. {
            let path = out.join(format!("bundles/bundle-{i:05}.json"));
            let Ok(text) = std::fs::read_to_string(path) else {
                break;
            };
            let b: serde_json::Value = serde_json::from_str(&text).expect("json");
            bundles.push(b["entry"].as_array().cloned().unwrap_or_default());
        }
        let shape: Vec<(usize, usize)> = bundles
            .iter()
            .map(|entries| {
                let patients = entries
                    .iter()
                    .filter(|e| e["resource"]["resourceType"] == "Patient")
                    .count();
                (entries.len(), patients)
            })
            .collect();
        // p1 with its 2; p2's 60 alone (its Patient goes on its own); p3 with its 47; the orphan.
        assert_eq!(shape, vec![(3, 1), (50, 0), (10, 0), (48, 1), (1, 0)]);
        let p2 = crate::resource::patient_placeholder("p2");
        let orphan = crate::resource::patient_placeholder("orphan");
        for entries in &bundles {
            let urls: Vec<&str> = entries
                .iter()
                .filter_map(|e| e["fullUrl"].as_str())
                .collect();
            for e in entries {
                if let Some(r) = e["resource"]["subject"]["reference"].as_str() {
                    // Placeholders resolve inside the Bundle, except for a Patient the loader
                    // creates before its resources.
                    assert!(urls.contains(&r) || r == p2 || r == orphan, "{r}");
                }
            }
        }
        let total: usize = bundles.iter().map(Vec::len).sum();
        // Every resource once; p2's Patient is in Patient.ndjson only.
        assert_eq!(total, 2 + 2 + 60 + 47 + 1);
    }

    #[test]
    fn a_foreign_non_empty_folder_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("thesis.docx"), b"x").expect("w");
        let r = DryRunSink::create(
            dir.path(),
            DryRunOptions {
                ccn: "12001".into(),
                bundles: false,
            },
        );
        assert!(r.is_err());
        assert!(dir.path().join("thesis.docx").exists());
    }
}
