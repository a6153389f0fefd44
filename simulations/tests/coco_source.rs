//! `simulate run` on a COCO source (`[data] source = "coco"`), on a tiny COCO export written
//! here: three folders (production lines) of four 64x64 PNG images with rectangles drawn as
//! defects of two categories, a test file with two images of each line and two of a fourth
//! line no plant trains on. Checked: the plants' image counts and disjoint sets by folder,
//! by an image field, by Dirichlet and IID; each plant's COCO file read back by the client's
//! loader holds exactly its images and their boxes with the source's classes; every refusal
//! names its cause; and a real federation (coordinator and three plant processes over mutual
//! TLS, 2 rounds, tiny detector) whose versions are the coordinator's, scored on the global,
//! unseen and own test sets, with both baselines (the centralised one must find the defects).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use fedinspect_client::data::coco::{self, CocoOptions};
use fedinspect_common::detection::BBox;
use fedinspect_simulations::evaluation::TestSet;
use fedinspect_simulations::experiment::Experiment;
use fedinspect_simulations::plant_data::{self, PreparedData};
use image::{Rgb, RgbImage};
use serde_json::{json, Value};

const SIDE: u32 = 64;
const LINES: [&str; 3] = ["line-a", "line-b", "line-c"];
/// Category ids on purpose not 0 and 1: class indices follow ascending ids.
const CATEGORIES: [(i64, &str); 2] = [(3, "scratch"), (7, "stain")];

/// An image's defects: `(category id, [x, y, w, h])`.
type Boxes = Vec<(i64, [f64; 4])>;

/// The tiny export: `coco/train.json`, `coco/test.json` and the images beside them.
struct Export {
    train: PathBuf,
    test: PathBuf,
    /// file_name -> boxes `(category id, [x, y, w, h])` of the training file.
    train_boxes: BTreeMap<String, Boxes>,
}

/// One image with `n` defects; returns its boxes. Deterministic in `k`.
fn draw_image(path: &Path, k: u32, n: u32) -> Boxes {
    let mut img = RgbImage::from_fn(SIDE, SIDE, |x, y| {
        let v = (90 + ((x * 7 + y * 13 + k * 29) % 23)) as u8;
        Rgb([v, v.saturating_add(10), v])
    });
    let mut boxes = Vec::new();
    for d in 0..n {
        let (x0, y0) = (4 + (k * 11 + d * 23) % 40, 4 + (k * 17 + d * 29) % 40);
        let (w, h) = (8 + (k + d) % 8, 6 + (k * 3 + d) % 8);
        let (cat, color) = if (k + d) % 2 == 0 {
            (CATEGORIES[0].0, Rgb([240, 240, 240]))
        } else {
            (CATEGORIES[1].0, Rgb([20, 20, 60]))
        };
        for x in x0..x0 + w {
            for y in y0..y0 + h {
                img.put_pixel(x, y, color);
            }
        }
        boxes.push((cat, [x0, y0, w, h].map(f64::from)));
    }
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).unwrap();
    boxes
}

/// A COCO file of `images` (file_name, site, boxes), with the extra keys exports carry.
fn coco_json(images: &[(String, &str, Boxes)], first_id: i64) -> Value {
    let mut records = Vec::new();
    let mut annotations = Vec::new();
    for (i, (name, site, boxes)) in images.iter().enumerate() {
        let id = first_id + i as i64;
        records.push(
            json!({"id": id, "file_name": name, "width": SIDE, "height": SIDE,
                            "site": site, "license": 1}),
        );
        for (cat, b) in boxes {
            annotations.push(json!({"id": 1000 + annotations.len(), "image_id": id,
                                    "category_id": cat, "bbox": b, "area": b[2] * b[3],
                                    "iscrowd": 0}));
        }
    }
    json!({
        "info": {"description": "tiny export"},
        "licenses": [{"id": 1, "name": "test"}],
        "images": records,
        "annotations": annotations,
        "categories": CATEGORIES.iter().map(|(id, n)| json!({"id": id, "name": n, "supercategory": "defect"})).collect::<Vec<_>>(),
    })
}

fn write_export(dir: &Path) -> Export {
    let root = dir.join("coco");
    let mut train = Vec::new();
    let mut k = 0;
    for (l, line) in LINES.iter().enumerate() {
        // line-a and line-b are site s1, line-c is s2 (group_by = "site").
        let site = if l < 2 { "s1" } else { "s2" };
        for i in 0..4 {
            let name = format!("{line}/img{i}.png");
            k += 1;
            let boxes = draw_image(&root.join(&name), k, 1 + i % 2);
            train.push((name, site, boxes));
        }
    }
    let mut test = Vec::new();
    for line in LINES.iter().chain(&["line-d"]) {
        for i in 0..2 {
            let name = format!("{line}/test{i}.png");
            k += 1;
            let boxes = draw_image(&root.join(&name), k, 1 + i % 2);
            test.push((name, "s3", boxes));
        }
    }
    let export = Export {
        train: root.join("train.json"),
        test: root.join("test.json"),
        train_boxes: train
            .iter()
            .map(|(n, _, b)| (n.clone(), b.clone()))
            .collect(),
    };
    let write = |p: &Path, v: Value| fs::write(p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    write(&export.train, coco_json(&train, 1));
    write(&export.test, coco_json(&test, 100));
    export
}

/// The `[data]` table of a COCO experiment.
fn data_table(e: &Export, split: &str, plants: u32, extra: &str) -> String {
    format!(
        "[data]\nsource = \"coco\"\npath = {:?}\ntest_path = {:?}\nsplit = \"{split}\"\nplants = {plants}\n{extra}\n",
        e.train.display().to_string(),
        e.test.display().to_string()
    )
}

fn prepare(text: &str, run: &Path) -> anyhow::Result<PreparedData> {
    let e = Experiment::parse(text, "coco", None).map_err(|e| anyhow::anyhow!("{e}"))?;
    plant_data::prepare(&e.base, &run.join("cache"), run)
}

/// Each plant's training file read by the client's loader: exactly its images, each with
/// the source's boxes and classes. Returns the plants' image sets.
fn check_plant_files(data: &PreparedData, e: &Export) -> Vec<BTreeSet<String>> {
    let mut sets = Vec::new();
    for p in &data.plants {
        let json = p.root.join("train.json");
        let loaded = coco::load(
            &json,
            &CocoOptions {
                image_root: Some(p.root.join("images")),
                group: None,
            },
        )
        .unwrap_or_else(|err| panic!("{}: {err}", p.id));
        assert!(loaded.findings.is_empty(), "{:?}", loaded.findings);
        assert_eq!(loaded.dataset.class_names, vec!["scratch", "stain"]);
        assert_eq!(loaded.dataset.items.len(), p.train_images, "{}", p.id);
        let mut names = BTreeSet::new();
        for item in &loaded.dataset.items {
            assert!(
                item.image.is_file(),
                "{} does not resolve",
                item.image.display()
            );
            let want: Vec<(u32, BBox)> = e.train_boxes[&item.id]
                .iter()
                .map(|(cat, [x, y, w, h])| {
                    let class = u32::from(*cat == CATEGORIES[1].0);
                    let b = BBox::new(*x as f32, *y as f32, (x + w) as f32, (y + h) as f32);
                    (class, b)
                })
                .collect();
            let got: Vec<(u32, BBox)> =
                item.annotations.iter().map(|a| (a.class, a.bbox)).collect();
            assert_eq!(got, want, "{} in {}", item.id, p.id);
            names.insert(item.id.clone());
        }
        // Only its images' annotations, and the source's other keys kept.
        let raw: Value = serde_json::from_slice(&fs::read(&json).unwrap()).unwrap();
        let boxes: usize = names.iter().map(|n| e.train_boxes[n].len()).sum();
        assert_eq!(raw["annotations"].as_array().unwrap().len(), boxes);
        assert_eq!(raw["info"]["description"], "tiny export");
        assert_eq!(raw["categories"].as_array().unwrap().len(), 2);
        sets.push(names);
    }
    let all: usize = sets.iter().map(BTreeSet::len).sum();
    let union: BTreeSet<&String> = sets.iter().flatten().collect();
    assert_eq!(union.len(), all, "an image is in two plants");
    assert_eq!(all, e.train_boxes.len(), "every training image in a plant");
    sets
}

fn sizes(data: &PreparedData) -> Vec<(usize, usize)> {
    data.plants
        .iter()
        .map(|p| (p.train_images, p.test_images))
        .collect()
}

#[test]
fn coco_splits_give_each_plant_its_own_images() {
    let dir = tempfile::tempdir().unwrap();
    let e = write_export(dir.path());

    // By folder: one line per plant, its line's test images its own, line-d unseen.
    let data = prepare(&data_table(&e, "group", 3, ""), &dir.path().join("group")).unwrap();
    println!("by folder: {:?}", sizes(&data));
    assert_eq!(sizes(&data), vec![(4, 2), (4, 2), (4, 2)]);
    let sets = check_plant_files(&data, &e);
    for ((p, line), set) in data.plants.iter().zip(LINES).zip(&sets) {
        assert_eq!(p.groups, vec![line]);
        assert!(set.iter().all(|n| n.starts_with(line)), "{}: {set:?}", p.id);
        let test: Value =
            serde_json::from_slice(&fs::read(p.root.join("test.json")).unwrap()).unwrap();
        for img in test["images"].as_array().unwrap() {
            assert!(img["file_name"].as_str().unwrap().starts_with(line));
        }
    }
    let unseen = data.unseen_test.as_ref().expect("line-d is unseen");
    let test: Value = serde_json::from_slice(&fs::read(unseen.join("test.json")).unwrap()).unwrap();
    let names: Vec<&str> = test["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["file_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["line-d/test0.png", "line-d/test1.png"]);
    assert_eq!(data.class_names, vec!["scratch", "stain"]);
    // The evaluation reads the prepared test files through the image links.
    let len = |root: &Path| TestSet::load(root, 64, 0).unwrap().len();
    assert_eq!(len(&data.source), 8, "the global test set");
    assert_eq!(len(unseen), 2);
    assert!(data.plants.iter().all(|p| len(&p.root) == 2));
    let arch = data.arch(64, 0.25);
    assert_eq!((arch.in_channels, arch.num_classes), (3, 2));

    // By an image field: site s1 (lines a and b) and s2 (line c).
    let text = data_table(&e, "group", 2, "group_by = \"site\"");
    let data = prepare(&text, &dir.path().join("site")).unwrap();
    println!("by site: {:?}", sizes(&data));
    assert_eq!(
        data.plants
            .iter()
            .map(|p| p.train_images)
            .collect::<Vec<_>>(),
        vec![8, 4]
    );
    assert_eq!(data.plants[0].groups, vec!["s1"]);
    check_plant_files(&data, &e);

    // IID: dealt evenly; Dirichlet: every image once, each plant at least two.
    let data = prepare(&data_table(&e, "iid", 3, ""), &dir.path().join("iid")).unwrap();
    println!("iid: {:?}", sizes(&data));
    assert_eq!(
        data.plants
            .iter()
            .map(|p| p.train_images)
            .collect::<Vec<_>>(),
        vec![4, 4, 4]
    );
    check_plant_files(&data, &e);
    let text = data_table(&e, "dirichlet", 3, "alpha = 0.5");
    let data = prepare(&text, &dir.path().join("dirichlet")).unwrap();
    println!(
        "dirichlet(0.5): {:?}, class skew {:.3}",
        sizes(&data),
        data.class_skew
    );
    assert!(data.plants.iter().all(|p| p.train_images >= 2));
    check_plant_files(&data, &e);
}

#[test]
fn coco_refusals_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let e = write_export(dir.path());
    let err = |text: &str, run: &str| match prepare(text, &dir.path().join(run)) {
        Ok(_) => panic!("{run}: accepted"),
        Err(err) => format!("{err:#}"),
    };

    let no_test = format!(
        "[data]\nsource = \"coco\"\npath = {:?}\n",
        e.train.display().to_string()
    );
    let m = err(&no_test, "no-test");
    assert!(m.contains("data.test_path: required"), "{m}");

    let text = data_table(&e, "group", 3, "").replace("train.json", "nothing.json");
    let m = err(&text, "missing");
    assert!(m.contains("nothing.json is not a file"), "{m}");

    let broken = dir.path().join("coco/broken.json");
    fs::write(&broken, "{\"images\": [").unwrap();
    let text = data_table(&e, "group", 3, "").replace("test.json", "broken.json");
    let m = err(&text, "broken");
    assert!(
        m.contains("data.test_path") && m.contains("is not COCO detection JSON"),
        "{m}"
    );

    let mut other: Value = serde_json::from_slice(&fs::read(&e.test).unwrap()).unwrap();
    other["categories"][1]["name"] = json!("dent");
    let renamed = dir.path().join("coco/renamed.json");
    fs::write(&renamed, other.to_string()).unwrap();
    let text = data_table(&e, "group", 3, "").replace("test.json", "renamed.json");
    let m = err(&text, "classes");
    assert!(
        m.contains("differ from those of the training file") && m.contains("7:dent"),
        "{m}"
    );

    let m = err(&data_table(&e, "group", 4, ""), "plants");
    assert!(
        m.contains("fall in 3 group(s)") && m.contains("use split = \"dirichlet\" or \"iid\""),
        "{m}"
    );

    let m = err(
        &data_table(&e, "group", 2, "group_by = \"camera\""),
        "field",
    );
    assert!(
        m.contains("12 of the 12 images") && m.contains("'camera'"),
        "{m}"
    );

    let m = err(
        "[data]\nsource = \"deeppcb\"\npath = \"/x\"\ngroup_by = \"site\"\n",
        "deeppcb",
    );
    assert!(
        m.contains("data.group_by only applies to source = \"coco\""),
        "{m}"
    );
}

#[test]
fn a_coco_federation_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let e = write_export(dir.path());
    let experiment = dir.path().join("coco_tiny.toml");
    let text = format!(
        "name = \"coco_tiny\"\nseed = 1\n{}\
         [model]\ninput_size = 64\ncrop_size = 64\nwidth = 0.25\nfpn_width = 16\nhead_width = 16\n\
         [federation]\nrounds = 2\nlocal_epochs = 40\nlearning_rate = 1e-2\nbatch_size = 2\ndeadline_secs = 120\nwarmup_steps = 2\n\
         [compute]\ndevice = \"cpu\"\nplant_threads = 1\nthreads = 1\n",
        data_table(&e, "group", 3, "")
    );
    fs::write(&experiment, text).unwrap();
    let out = dir.path().join("out");
    let runs = support::simulate_experiment(experiment, &out, "the COCO experiment");
    let m = &runs[0];
    let run_dir = out.join("runs").join(&m.label);
    let site = run_dir.join("site");

    // Each plant read its own COCO file.
    for p in &m.plants {
        let cfg: toml::Table = toml::from_str(
            &fs::read_to_string(site.join("plants").join(&p.id).join("plant.toml")).unwrap(),
        )
        .unwrap();
        let coco = cfg["data"]["coco"].as_str().unwrap();
        assert_eq!(
            Path::new(coco),
            run_dir.join("plant-data").join(&p.id).join("train.json")
        );
        assert_eq!(p.train_images, 4);
    }

    // Two published versions, each the coordinator's, bit for bit.
    let updates = support::check_published_versions(&site, 2);
    assert_eq!(m.federated.len(), 2);
    for r in &m.federated {
        assert_eq!(r.version, Some(r.round + 1));
        let admin: Value = serde_json::from_slice(
            &fs::read(site.join(format!("models/v{:04}.json", r.round + 1))).unwrap(),
        )
        .unwrap();
        assert_eq!(r.model_hash.as_deref(), admin["content_hash"].as_str());
        assert_eq!(r.participants, 3);
        let stored: u64 = updates[&r.round].iter().map(|u| u.payload_bytes).sum();
        assert_eq!(r.bytes_up, stored);
        let s = r.scores.as_ref().expect("a published round is scored");
        assert_eq!(s.plants.len(), 3, "every plant's own test set");
        assert!(s.unseen.is_some(), "line-d is the unseen test set");
        println!(
            "round {}: global map_33 {:.3} map_50 {:.3}, unseen map_33 {:.3}, bytes up {}",
            r.round,
            s.global.map_33,
            s.global.map_50,
            s.unseen.unwrap().map_33,
            r.bytes_up
        );
    }
    assert_eq!(m.global_test_images, 8);
    assert_eq!(m.unseen_test_images, Some(2));
    assert_eq!(m.centralised.len(), 2);
    assert_eq!(m.local_only.len(), 2);
    assert_eq!(m.local_only[1].own.len(), 3);
    let centralised = m.centralised[1].scores.global.map_33;
    println!(
        "centralised round 2: global map_33 {centralised:.3}; local-only mean global map_33 {:.3}",
        m.local_only[1].mean_global.map_33
    );
    // Solid rectangles on a flat background are easy: a model trained on the union of the
    // plants' COCO files finds them in the test file, which it can only if the evaluation
    // reads the same classes, boxes and pixels as the training.
    assert!(
        centralised > 0.5,
        "centralised map_33 {centralised}: the COCO training or test data is misread"
    );
    let json: Value =
        serde_json::from_slice(&fs::read(run_dir.join("metrics.json")).unwrap()).unwrap();
    let maps = collect_maps(&json);
    assert!(maps.len() > 40, "{} mAP values", maps.len());
    assert!(maps.iter().all(|v| (0.0..=1.0).contains(v)), "{maps:?}");
    let report = fs::read_to_string(run_dir.join("report.md")).unwrap();
    assert!(report.contains("map33_vs_round.png"), "{report}");
}

/// Every number under a `map_33` or `map_50` key.
fn collect_maps(v: &Value) -> Vec<f64> {
    let mut out = Vec::new();
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(o) => {
                for (k, x) in o {
                    if k == "map_33" || k == "map_50" {
                        out.extend(x.as_f64());
                    } else {
                        stack.push(x);
                    }
                }
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    out
}

#[test]
fn a_json_data_flag_means_a_coco_source() {
    use fedinspect_simulations::experiment::Source;
    let text = "[data]\ntest_path = \"/data/test.json\"\n";
    let e = Experiment::parse(text, "t", Some(Path::new("/data/train.json"))).unwrap();
    assert_eq!(e.base.data.source, Source::Coco);
    assert_eq!(e.base.data.group_by, "folder");
    assert_eq!(e.base.data.plants, 3);
    let e = Experiment::parse("", "t", Some(Path::new("/data/PCBData"))).unwrap();
    assert_eq!(e.base.data.source, Source::Deeppcb);
}
