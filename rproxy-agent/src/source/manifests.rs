//! Services and `EndpointSlices` from a directory of Kubernetes manifests (YAML or JSON, one or
//! more documents per file, `kind: List` as `kubectl get -o yaml` writes it).
//!
//! Only `v1` Services and `discovery.k8s.io/v1` `EndpointSlices` are kept; other kinds are
//! skipped silently. A file or document that cannot be read or parsed becomes a [`Problem`]
//! (kind `"file"`, object = the file) and everything else still loads.
use std::{ffi::OsStr, fmt, fs, path::Path};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_yaml_ng::Value;
use tracing::debug;

use crate::{
    error::Error,
    model::Problem,
    translate::{DEFAULT_NAMESPACE, Objects},
};

/// Extensions (compared without regard to ASCII case) of the files [`load_dir`] reads.
pub const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// Parses one file's text (multi-document YAML; JSON is YAML too). `origin` names the file in
/// problems. Objects without a namespace get [`DEFAULT_NAMESPACE`].
#[must_use]
pub fn parse_documents(text: &str, origin: &str) -> (Objects, Vec<Problem>) {
    let mut parser = Parser { origin, objects: Objects::default(), problems: Vec::new() };
    for (line, document) in split_documents(text) {
        parser.document(line, document);
    }
    (parser.objects, parser.problems)
}

/// Reads every `*.yaml`, `*.yml` and `*.json` file directly in `dir` (not recursive; hidden
/// files and editor temporaries such as `.foo.swp` or `foo~` are skipped), in name order, and
/// merges them. Symbolic links are followed, so a mounted `ConfigMap` works.
///
/// Fails only if `dir` itself cannot be read; an unreadable or unparsable file is a problem.
pub fn load_dir(dir: &Path) -> Result<(Objects, Vec<Problem>), Error> {
    let entries = fs::read_dir(dir).map_err(|source| Error::ManifestsDir { path: dir.to_path_buf(), source })?;
    let mut problems = Vec::new();
    let mut files = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) if is_manifest_name(&entry.file_name()) && !is_dir(&entry.path()) => files.push(entry.path()),
            Ok(entry) => debug!(path = %entry.path().display(), "skipping: not a manifest file"),
            Err(err) => {
                let reason = format!("listing the directory: {err}");
                problems.push(file_problem(&dir.display().to_string(), reason));
            }
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));

    let mut objects = Objects::default();
    for path in files {
        let (file_objects, file_problems) = load_file(&path);
        objects.append(file_objects);
        problems.extend(file_problems);
    }
    Ok((objects, problems))
}

/// Largest manifests file read: a bigger one is refused whole (a problem naming it), not read
/// into memory. The API server's own limit on an object is about 1.5 MiB.
pub const MAX_FILE_BYTES: u64 = 32 << 20;

fn load_file(path: &Path) -> (Objects, Vec<Problem>) {
    let origin = path.display().to_string();
    match fs::metadata(path) {
        Ok(meta) if meta.len() > MAX_FILE_BYTES => {
            let reason = format!("{} bytes, more than the {MAX_FILE_BYTES} read", meta.len());
            return (Objects::default(), vec![file_problem(&origin, reason)]);
        }
        _ => {}
    }
    match fs::read_to_string(path) {
        Ok(text) => parse_documents(&text, &origin),
        Err(err) => (Objects::default(), vec![file_problem(&origin, format!("cannot read: {err}"))]),
    }
}

/// A visible file name with a manifest extension, not an editor temporary.
fn is_manifest_name(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    let extension = Path::new(name).extension().and_then(OsStr::to_str);
    !name.starts_with('.')
        && !name.ends_with('~')
        && extension.is_some_and(|ext| EXTENSIONS.iter().any(|known| ext.eq_ignore_ascii_case(known)))
}

/// Follows symbolic links; a dangling one is not a directory (reading it reports the problem).
fn is_dir(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.is_dir())
}

fn file_problem(origin: &str, reason: String) -> Problem {
    Problem { kind: "file", object: origin.to_owned(), reason, transient: false }
}

/// Splits a YAML stream at its document markers (`---` at the start of a line, as kubectl
/// does), so that a broken document does not take the following ones with it. Returns each
/// document's first line (1-based) and text; a marker line stays with its document.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut documents = Vec::new();
    let (mut start, mut start_line, mut offset) = (0, 1, 0);
    for (index, line) in text.split_inclusive('\n').enumerate() {
        if offset > start && is_document_marker(line) {
            documents.push((start_line, &text[start..offset]));
            (start, start_line) = (offset, index + 1);
        }
        offset += line.len();
    }
    documents.push((start_line, &text[start..]));
    documents
}

fn is_document_marker(line: &str) -> bool {
    line.strip_prefix("---").is_some_and(|rest| rest.chars().next().is_none_or(char::is_whitespace))
}

/// Every YAML document of `text`, stopping at the first error (the parser cannot go on).
fn parse_values(text: &str) -> Result<Vec<Value>, serde_yaml_ng::Error> {
    let mut values = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let mut value = Value::deserialize(document)?;
        value.apply_merge()?;
        values.push(value);
    }
    Ok(values)
}

/// Where an object was found, for problems: a document, or an item of a `List` document.
#[derive(Clone, Copy)]
struct Site {
    line: usize,
    item: Option<usize>,
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document at line {}", self.line)?;
        match self.item {
            Some(item) => write!(f, ", item {item}"),
            None => Ok(()),
        }
    }
}

/// The kinds this module reads.
enum Kind {
    Service,
    EndpointSlice,
    List,
}

impl Kind {
    fn of(api_version: &str, kind: &str) -> Option<Self> {
        match (api_version, kind) {
            ("v1", "Service") => Some(Self::Service),
            ("discovery.k8s.io/v1", "EndpointSlice") => Some(Self::EndpointSlice),
            ("v1", "List") => Some(Self::List),
            _ => None,
        }
    }
}

/// Accumulates the objects and problems of one file.
struct Parser<'a> {
    origin: &'a str,
    objects: Objects,
    problems: Vec<Problem>,
}

impl Parser<'_> {
    fn problem(&mut self, site: Site, reason: impl fmt::Display) {
        self.problems.push(file_problem(self.origin, format!("{site}: {reason}")));
    }

    /// One document (normally; text between two markers may hold more) starting at `line`.
    fn document(&mut self, line: usize, text: &str) {
        let site = Site { line, item: None };
        match parse_values(text) {
            Ok(values) => values.into_iter().for_each(|value| self.object(value, site)),
            Err(err) => {
                // Parse again with the lines before the document blanked, so that the error's
                // position counts lines from the start of the file. Only on this error path.
                let padded = format!("{}{text}", "\n".repeat(line.saturating_sub(1)));
                let err = parse_values(&padded).err().unwrap_or(err);
                self.problem(site, format_args!("invalid YAML: {err}"));
            }
        }
    }

    /// Dispatches one object on its `apiVersion` and `kind`.
    fn object(&mut self, value: Value, site: Site) {
        if value.is_null() {
            return;
        }
        let api_version = value.get("apiVersion").and_then(Value::as_str);
        let kind_name = value.get("kind").and_then(Value::as_str);
        let (Some(api_version), Some(kind_name)) = (api_version, kind_name) else {
            self.problem(site, "not a Kubernetes object (no apiVersion or kind)");
            return;
        };
        match Kind::of(api_version, kind_name) {
            Some(Kind::Service) => {
                if let Some(service) = self.typed::<Service>(value, site, "Service", |s| &mut s.metadata) {
                    self.objects.services.push(service);
                }
            }
            Some(Kind::EndpointSlice) => {
                if let Some(slice) = self.typed::<EndpointSlice>(value, site, "EndpointSlice", |s| &mut s.metadata) {
                    self.objects.slices.push(slice);
                }
            }
            Some(Kind::List) if site.item.is_none() => self.list(value, site),
            _ => debug!(origin = self.origin, %site, api_version, kind = kind_name, "ignoring object"),
        }
    }

    /// The items of a `v1` `List`.
    fn list(&mut self, value: Value, site: Site) {
        let items = match value {
            Value::Mapping(mut fields) => fields.swap_remove("items"),
            _ => None,
        };
        match items {
            None | Some(Value::Null) => {}
            Some(Value::Sequence(items)) => {
                for (index, item) in items.into_iter().enumerate() {
                    self.object(item, Site { item: Some(index + 1), ..site });
                }
            }
            Some(_) => self.problem(site, "List: items is not a list"),
        }
    }

    /// Deserializes one object into its k8s-openapi type, defaulting its namespace. A failure
    /// is a problem naming the kind, the object (if its name can be read) and the error.
    fn typed<T: DeserializeOwned>(
        &mut self,
        value: Value,
        site: Site,
        kind: &str,
        metadata: impl FnOnce(&mut T) -> &mut ObjectMeta,
    ) -> Option<T> {
        let name = display_name(&value);
        match serde_yaml_ng::from_value::<T>(value) {
            Ok(mut object) => {
                let meta = metadata(&mut object);
                if meta.namespace.as_deref().is_none_or(str::is_empty) {
                    meta.namespace = Some(DEFAULT_NAMESPACE.to_owned());
                }
                Some(object)
            }
            Err(err) => {
                self.problem(site, format_args!("{kind} {name}: {err}"));
                None
            }
        }
    }
}

/// `namespace/name` read from untyped metadata, as far as it can be.
fn display_name(value: &Value) -> String {
    let field = |key: &str| value.get("metadata").and_then(|meta| meta.get(key)).and_then(Value::as_str);
    let namespace = field("namespace").filter(|ns| !ns.is_empty()).unwrap_or(DEFAULT_NAMESPACE);
    match field("name") {
        Some(name) => format!("{namespace}/{name}"),
        None => format!("{namespace}/(no name)"),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn names(objects: &Objects) -> (Vec<String>, Vec<String>) {
        let name = |meta: &ObjectMeta| {
            format!("{}/{}", meta.namespace.as_deref().unwrap_or("?"), meta.name.as_deref().unwrap_or("?"))
        };
        (
            objects.services.iter().map(|s| name(&s.metadata)).collect(),
            objects.slices.iter().map(|s| name(&s.metadata)).collect(),
        )
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|&s| s.to_owned()).collect()
    }

    fn problem(object: &str, reason: &str) -> Problem {
        file_problem(object, reason.to_owned())
    }

    const MULTI: &str = "\
# leading comment: an empty first document
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
    targetPort: http
---
---   # empty document with a comment
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
---
apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: not-core
--- # kubectl get -o yaml
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata:
    name: api
    namespace: shop
  spec:
    clusterIP: 10.96.0.11
    ports: [{port: 443}]
- apiVersion: v1
  kind: ConfigMap
  metadata:
    name: settings
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata:
    name: api-x
    namespace: shop
    labels: {kubernetes.io/service-name: api}
  addressType: IPv4
  endpoints: [{addresses: [10.0.0.1]}]
  ports: [{port: 8443}]
...
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-x
  namespace: \"\"
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
endpoints:
- addresses: [\"10.0.0.2\"]
ports:
- name: http
  port: 8080
";

    #[test]
    fn multi_document_file_with_a_list() {
        let (objects, problems) = parse_documents(MULTI, "multi.yaml");
        assert_eq!(problems, vec![]);
        assert_eq!(names(&objects), (strings(&["default/web", "shop/api"]), strings(&["shop/api-x", "default/web-x"])));
        let ports = objects.services[0].spec.as_ref().and_then(|spec| spec.ports.as_ref()).map(Vec::len);
        assert_eq!(ports, Some(1));
    }

    #[test]
    fn json_is_read_too() {
        let text = r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "n"},
                      "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}}"#;
        let (objects, problems) = parse_documents(text, "web.json");
        assert_eq!(problems, vec![]);
        assert_eq!(names(&objects), (strings(&["n/web"]), vec![]));
    }

    #[test]
    fn broken_documents_are_reported_and_the_others_loaded() {
        let text = "\
apiVersion: v1
kind: Service
metadata: {name: first}
---
apiVersion: v1
kind: Service
metadata: {name: broken
  x: [
---
apiVersion: v1
kind: Service
metadata: {name: ports-not-a-list, namespace: web}
spec:
  ports: \"80\"
---
apiVersion: v1
kind: Service
metadata: {}
spec:
  ports: [{port: http}]
---
just a string
---
apiVersion: v1
kind: List
items: 3
---
apiVersion: v1
kind: List
items:
- {apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: bad-endpoints}, endpoints: 5}
- {apiVersion: v1, kind: Service, metadata: {name: second}}
---
apiVersion: v1
kind: Service
metadata: {name: last}
";
        let (objects, problems) = parse_documents(text, "mixed.yaml");
        assert_eq!(names(&objects), (strings(&["default/first", "default/second", "default/last"]), vec![]));
        let expected = vec![
            problem(
                "mixed.yaml",
                "document at line 4: invalid YAML: did not find expected ',' or '}' at line 8 column 4, \
                 while parsing a flow mapping at line 7 column 11",
            ),
            problem(
                "mixed.yaml",
                "document at line 9: Service web/ports-not-a-list: invalid type: string \"80\", expected a sequence",
            ),
            problem(
                "mixed.yaml",
                "document at line 15: Service default/(no name): invalid type: string \"http\", expected i32",
            ),
            problem("mixed.yaml", "document at line 21: not a Kubernetes object (no apiVersion or kind)"),
            problem("mixed.yaml", "document at line 23: List: items is not a list"),
            problem(
                "mixed.yaml",
                "document at line 27, item 1: EndpointSlice default/bad-endpoints: invalid type: integer `5`, expected a sequence",
            ),
        ];
        assert_eq!(problems, expected);
    }

    #[test]
    fn document_markers() {
        assert_eq!(split_documents(""), vec![(1, "")]);
        assert_eq!(split_documents("a: 1\n"), vec![(1, "a: 1\n")]);
        assert_eq!(
            split_documents("---\na: 1\n--- # c\r\nb: 2\n---x: 3\n--- {c: 4}\n"),
            vec![(1, "---\na: 1\n"), (3, "--- # c\r\nb: 2\n---x: 3\n"), (6, "--- {c: 4}\n")]
        );
        let (objects, problems) = parse_documents("--- {apiVersion: v1, kind: Service, metadata: {name: a}}\n", "f");
        assert_eq!((names(&objects), problems), ((strings(&["default/a"]), vec![]), vec![]));
    }

    #[test]
    fn manifest_file_names() {
        for name in ["a.yaml", "a.yml", "a.json", "A.YAML", "with.dots.yaml"] {
            assert!(is_manifest_name(OsStr::new(name)), "{name}");
        }
        for name in [".a.yaml", ".a.yaml.swp", "a.yaml~", "#a.yaml#", "a.txt", "a.yaml.bak", "yaml", "a"] {
            assert!(!is_manifest_name(OsStr::new(name)), "{name}");
        }
    }

    fn service_yaml(name: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n")
    }

    #[test]
    fn load_dir_reads_manifests_in_name_order() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("manifests");
        fs::create_dir(&dir).unwrap();
        let write = |name: &str, content: &[u8]| fs::write(dir.join(name), content).unwrap();
        write("b.yaml", service_yaml("b").as_bytes());
        write("a.yml", service_yaml("a").as_bytes());
        write(
            "c.json",
            br#"{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "c"}, "addressType": "IPv4"}"#,
        );
        // Skipped: not a manifest name, hidden, editor temporaries, a directory.
        write("notes.txt", service_yaml("txt").as_bytes());
        write(".hidden.yaml", service_yaml("hidden").as_bytes());
        write(".a.yml.swp", service_yaml("swp").as_bytes());
        write("b.yaml~", service_yaml("backup").as_bytes());
        fs::create_dir(dir.join("sub.yaml")).unwrap();
        fs::write(dir.join("sub.yaml").join("d.yaml"), service_yaml("nested")).unwrap();
        // Followed: a symbolic link to a file elsewhere (as in a mounted ConfigMap).
        fs::write(root.path().join("outside.yaml"), service_yaml("linked")).unwrap();
        symlink(root.path().join("outside.yaml"), dir.join("link.yaml")).unwrap();
        // Unreadable: a dangling link, and a file that is not UTF-8.
        symlink(root.path().join("missing.yaml"), dir.join("dangling.yaml")).unwrap();
        write("latin1.yaml", b"apiVersion: v1\nkind: Service\nmetadata: {name: caf\xe9}\n");

        let (objects, problems) = load_dir(&dir).unwrap();
        assert_eq!(names(&objects), (strings(&["default/a", "default/b", "default/linked"]), strings(&["default/c"])));
        let path = |name: &str| dir.join(name).display().to_string();
        let expected = vec![
            problem(&path("dangling.yaml"), "cannot read: No such file or directory (os error 2)"),
            problem(&path("latin1.yaml"), "cannot read: stream did not contain valid UTF-8"),
        ];
        assert_eq!(problems, expected);
    }

    #[test]
    fn load_dir_fails_only_for_the_directory_itself() {
        let root = tempfile::tempdir().unwrap();
        let missing = root.path().join("missing");
        let err = load_dir(&missing).unwrap_err();
        assert!(matches!(&err, Error::ManifestsDir { path, .. } if *path == missing), "{err}");

        let (objects, problems) = load_dir(root.path()).unwrap();
        assert_eq!((objects.services.len(), objects.slices.len(), problems), (0, 0, vec![]));
    }

    #[test]
    fn manifests_translate_end_to_end() {
        let (objects, problems) = parse_documents(MULTI, "multi.yaml");
        assert_eq!(problems, vec![]);
        let out = crate::translate::translate(&objects, &crate::model::NodeContext::named("node-a"));
        assert_eq!(out.problems, vec![]);
        let rendered: Vec<String> = out
            .desired
            .services
            .iter()
            .map(|(frontend, entry)| {
                let slots: Vec<String> = entry.slots.iter().map(|backend| backend.addr.to_string()).collect();
                format!("{frontend} {} {:?} -> {}", entry.service, entry.port_name, slots.join(","))
            })
            .collect();
        assert_eq!(
            rendered,
            strings(&[
                "10.96.0.10:80/TCP default/web \"http\" -> 10.0.0.2:8080/TCP",
                "10.96.0.11:443/TCP shop/api \"\" -> 10.0.0.1:8443/TCP",
            ])
        );
    }
}
