//! The DeepPCB loader: the official split files (`trainval.txt`, `test.txt`) under the
//! `PCBData` folder, each line naming a `_test.jpg` / `_temp.jpg` pair and its annotation file
//! of `x1 y1 x2 y2 type` lines (types 1..=6 become classes 0..=5). Parse problems become
//! findings for [`validate`](super::validate::validate); only an unreadable split file fails.

use std::fs;
use std::path::{Path, PathBuf};

use fedinspect_common::detection::{Annotation, BBox};

use super::validate::{Finding, Issue, Loaded};
use super::{Dataset, Item};

/// DeepPCB defect types 1..=6, as class indices 0..=5.
pub const CLASS_NAMES: [&str; 6] = [
    "open",
    "short",
    "mousebite",
    "spur",
    "spurious_copper",
    "pin_hole",
];

/// The official split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// `trainval.txt`: 1000 pairs from 7 board groups.
    TrainVal,
    /// `test.txt`: 500 pairs, including 4 groups never seen in training.
    Test,
}

#[derive(Clone, Debug)]
pub struct DeepPcbOptions {
    /// Fill `Item::template` with the `_temp.jpg` path (needed for 2-channel input).
    pub template: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DeepPcbError {
    #[error("cannot read split file {path}: {source}; point the data path at the PCBData folder that holds trainval.txt and test.txt")]
    SplitFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("split file {path} lists no image pairs; use the official trainval.txt or test.txt")]
    EmptySplit { path: PathBuf },
}

impl Split {
    pub fn file_name(self) -> &'static str {
        match self {
            Split::TrainVal => "trainval.txt",
            Split::Test => "test.txt",
        }
    }
}

impl Default for DeepPcbOptions {
    fn default() -> Self {
        Self { template: true }
    }
}

/// Loads one official split from `root` (the `PCBData` folder).
pub fn load(root: &Path, split: Split, options: &DeepPcbOptions) -> Result<Loaded, DeepPcbError> {
    load_split_file(root, &root.join(split.file_name()), options)
}

/// Loads the pairs listed in `split_file` (same format as the official ones), with paths
/// relative to `root`.
pub fn load_split_file(
    root: &Path,
    split_file: &Path,
    options: &DeepPcbOptions,
) -> Result<Loaded, DeepPcbError> {
    let text = fs::read_to_string(split_file).map_err(|source| DeepPcbError::SplitFile {
        path: split_file.to_path_buf(),
        source,
    })?;
    let mut items = Vec::new();
    let mut findings = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        if line.trim().is_empty() {
            continue;
        }
        let Some((image, annotation)) = parse_split_line(line) else {
            findings.push(Finding {
                item: None,
                id: split_file.display().to_string(),
                issue: Issue::BadSplitLine {
                    path: split_file.to_path_buf(),
                    line: line_no,
                    text: line.to_string(),
                },
            });
            continue;
        };
        let index = items.len();
        let (item, issues) = read_item(root, image, annotation, options);
        findings.extend(issues.into_iter().map(|issue| Finding {
            item: Some(index),
            id: item.id.clone(),
            issue,
        }));
        items.push(item);
    }
    if items.is_empty() && findings.is_empty() {
        return Err(DeepPcbError::EmptySplit {
            path: split_file.to_path_buf(),
        });
    }
    let n = items.len();
    Ok(Loaded {
        dataset: Dataset {
            class_names: CLASS_NAMES.iter().map(|s| s.to_string()).collect(),
            items,
        },
        findings,
        notes: Vec::new(),
        declared_sizes: vec![None; n],
    })
}

/// `groupG/G/XXXXXXXX.jpg groupG/G_not/XXXXXXXX.txt` -> the two relative paths.
fn parse_split_line(line: &str) -> Option<(&str, &str)> {
    let mut parts = line.split_whitespace();
    let (image, annotation) = (parts.next()?, parts.next()?);
    let ok = parts.next().is_none() && image.contains('.') && !image.ends_with('.');
    ok.then_some((image, annotation))
}

fn read_item(
    root: &Path,
    image: &str,
    annotation: &str,
    options: &DeepPcbOptions,
) -> (Item, Vec<Issue>) {
    let stem = image.rsplit_once('.').map_or(image, |(stem, _)| stem);
    let group = stem.split('/').next().unwrap_or(stem).to_string();
    let ann_path = root.join(annotation);
    let (annotations, issues) = read_annotations(&ann_path);
    let item = Item {
        id: stem.to_string(),
        group,
        image: root.join(format!("{stem}_test.jpg")),
        template: options
            .template
            .then(|| root.join(format!("{stem}_temp.jpg"))),
        annotations,
    };
    (item, issues)
}

fn read_annotations(path: &Path) -> (Vec<Annotation>, Vec<Issue>) {
    let text = match fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => {
            let path = path.to_path_buf();
            return (Vec::new(), vec![Issue::MissingAnnotationFile { path }]);
        }
    };
    let (annotations, issues) = parse_annotations(&text, path);
    if annotations.is_empty() && issues.is_empty() {
        let path = path.to_path_buf();
        return (annotations, vec![Issue::EmptyAnnotationFile { path }]);
    }
    (annotations, issues)
}

/// Parses `x1 y1 x2 y2 type` lines (spaces or commas), skipping blank lines; `path` only
/// labels the findings.
pub fn parse_annotations(text: &str, path: &Path) -> (Vec<Annotation>, Vec<Issue>) {
    let mut annotations = Vec::new();
    let mut issues = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|s| !s.is_empty())
            .collect();
        if fields.is_empty() {
            continue;
        }
        let coords: Vec<f32> = fields
            .iter()
            .take(4)
            .filter_map(|s| s.parse().ok())
            .collect();
        let kind = fields.get(4).and_then(|s| s.parse::<i64>().ok());
        match (fields.len(), coords.as_slice(), kind) {
            (5, &[x1, y1, x2, y2], Some(kind)) => match kind {
                1..=6 => annotations.push(Annotation {
                    bbox: BBox::new(x1, y1, x2, y2),
                    class: (kind - 1) as u32,
                }),
                _ => issues.push(Issue::UnknownCategory { category: kind }),
            },
            _ => issues.push(Issue::UnparseableAnnotation {
                path: path.to_path_buf(),
                line: n + 1,
                text: line.to_string(),
            }),
        }
    }
    (annotations, issues)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_and_flags_bad_ones() {
        let text = "1 2 3 4 1\n\n10,20,30,40,6\n5 5 9 9 7\n1 2 three 4 2\n";
        let (anns, issues) = parse_annotations(text, Path::new("a.txt"));
        assert_eq!(anns.len(), 2);
        assert_eq!(anns[1].class, 5);
        assert_eq!(anns[1].bbox, BBox::new(10.0, 20.0, 30.0, 40.0));
        assert_eq!(issues[0], Issue::UnknownCategory { category: 7 });
        assert!(matches!(
            issues[1],
            Issue::UnparseableAnnotation { line: 5, .. }
        ));
    }

    #[test]
    fn split_line_shape() {
        let line = "group1/1/00000001.jpg group1/1_not/00000001.txt";
        assert_eq!(
            parse_split_line(line),
            Some(("group1/1/00000001.jpg", "group1/1_not/00000001.txt"))
        );
        assert_eq!(parse_split_line("only-one-field.jpg"), None);
        assert_eq!(parse_split_line("a.jpg b.txt c"), None);
    }
}
