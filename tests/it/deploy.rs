//! The deployment files: the Kubernetes manifests, the systemd unit, the Dockerfile and the
//! least-privilege SQL. The manifests and the unit are parsed and checked field by field, the
//! configuration they carry is loaded with the daemon's own loader and their command lines
//! with its own parser; the unit goes through `systemd-analyze` where it exists; the SQL runs
//! against a real PostgreSQL in a throwaway database.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use imprint_sync::cli::{Cli, Command as Cmd};
use imprint_sync::config::{Needs, Settings};
use serde::Deserialize;
use serde_yaml_ng::Value;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

// ---------------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------------

const K8S: &str = "deploy/k8s";

/// Every document of a (multi-document) YAML file; empty documents are skipped.
fn yaml_docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{rel}: invalid YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// Walks a path of mapping keys and sequence indexes ("spec.template.spec.containers.0").
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for part in path.split('.') {
        let next = match part.parse::<usize>() {
            Ok(i) => cur.get(i),
            Err(_) => cur.get(part),
        };
        cur = next.unwrap_or_else(|| panic!("missing `{path}` (at `{part}`) in {v:?}"));
    }
    cur
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("`{path}` is not a string"))
}

fn seq<'a>(v: &'a Value, path: &str) -> &'a Vec<Value> {
    at(v, path)
        .as_sequence()
        .unwrap_or_else(|| panic!("`{path}` is not a list"))
}

fn strings(v: &Value, path: &str) -> Vec<String> {
    seq(v, path)
        .iter()
        .map(|x| x.as_str().expect("a string").to_owned())
        .collect()
}

/// The kustomization and the documents of every file it lists, by file name.
struct Kustomize {
    kustomization: Value,
    resources: Vec<String>,
}

fn kustomization() -> Kustomize {
    let docs = yaml_docs(&format!("{K8S}/kustomization.yaml"));
    assert_eq!(docs.len(), 1, "kustomization.yaml holds one document");
    let k = docs.into_iter().next().unwrap();
    assert_eq!(s(&k, "kind"), "Kustomization");
    let resources = strings(&k, "resources");
    Kustomize {
        kustomization: k,
        resources,
    }
}

/// All objects of the deployed set (the kustomization's resources), with the file they came from.
fn deployed_objects() -> Vec<(String, Value)> {
    let k = kustomization();
    let mut out = Vec::new();
    for file in &k.resources {
        for doc in yaml_docs(&format!("{K8S}/{file}")) {
            out.push((file.clone(), doc));
        }
    }
    out
}

/// The one object the kustomization takes from `file`.
fn from_file(objects: &[(String, Value)], file: &str) -> Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|(f, _)| f == file)
        .map(|(_, o)| o)
        .collect();
    assert_eq!(found.len(), 1, "expected one object from {file}");
    found[0].clone()
}

fn one_of_kind(objects: &[(String, Value)], kind: &str) -> Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|(_, o)| o.get("kind").and_then(Value::as_str) == Some(kind))
        .map(|(_, o)| o)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind} in the kustomization"
    );
    found[0].clone()
}

fn only_doc(rel: &str) -> Value {
    let docs = yaml_docs(rel);
    assert_eq!(docs.len(), 1, "{rel} holds one document");
    docs.into_iter().next().unwrap()
}

/// The image the kustomization pins: newName:newTag of its `images` entry.
fn pinned_image(k: &Value) -> (String, String) {
    let images = seq(k, "images");
    assert_eq!(images.len(), 1, "one image entry");
    let name = s(&images[0], "name").to_owned();
    let full = format!("{}:{}", s(&images[0], "newName"), s(&images[0], "newTag"));
    (name, full)
}

fn parse_cli(args: &[String]) -> Cli {
    let argv = std::iter::once("imprint-sync".to_owned()).chain(args.iter().cloned());
    Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("args {args:?} do not parse: {e}"))
}

/// The security context every container must carry, wherever it runs.
fn assert_container_hardened(c: &Value) {
    let name = s(c, "name");
    let sc = at(c, "securityContext");
    assert_eq!(
        at(sc, "runAsNonRoot").as_bool(),
        Some(true),
        "{name}: runAsNonRoot"
    );
    assert_eq!(
        at(sc, "runAsUser").as_i64(),
        Some(65532),
        "{name}: runAsUser"
    );
    assert_eq!(
        at(sc, "readOnlyRootFilesystem").as_bool(),
        Some(true),
        "{name}: readOnlyRootFilesystem"
    );
    assert_eq!(
        at(sc, "allowPrivilegeEscalation").as_bool(),
        Some(false),
        "{name}: allowPrivilegeEscalation"
    );
    assert_eq!(
        strings(sc, "capabilities.drop"),
        ["ALL"],
        "{name}: drop ALL"
    );
    assert!(
        sc.get("capabilities").and_then(|c| c.get("add")).is_none(),
        "{name}: no capability added"
    );
    assert_eq!(s(sc, "seccompProfile.type"), "RuntimeDefault", "{name}");
    for kind in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            let path = format!("resources.{kind}.{res}");
            assert!(!s_or_num(c, &path).is_empty(), "{name}: {path} must be set");
        }
    }
}

/// A quantity that YAML may have read as a number ("1") or a string ("256Mi").
fn s_or_num(v: &Value, path: &str) -> String {
    match at(v, path) {
        Value::String(x) => x.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("`{path}` is neither a string nor a number: {other:?}"),
    }
}

fn assert_pod_hardened(pod: &Value) {
    let sc = at(pod, "securityContext");
    assert_eq!(at(sc, "runAsNonRoot").as_bool(), Some(true));
    assert_eq!(at(sc, "runAsUser").as_i64(), Some(65532));
    assert_eq!(s(sc, "seccompProfile.type"), "RuntimeDefault");
    assert_eq!(
        at(pod, "automountServiceAccountToken").as_bool(),
        Some(false)
    );
    assert!(pod.get("hostNetwork").is_none() && pod.get("hostPID").is_none());
}

/// The env entries of a container by name: a literal value, or the `secret/key` it comes from.
fn env_of(c: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in c
        .get("env")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
    {
        let name = s(e, "name").to_owned();
        let value = if let Some(v) = e.get("value") {
            v.as_str().expect("env value is a string").to_owned()
        } else {
            format!(
                "secret:{}/{}",
                s(e, "valueFrom.secretKeyRef.name"),
                s(e, "valueFrom.secretKeyRef.key")
            )
        };
        assert!(
            out.insert(name.clone(), value).is_none(),
            "{name} set twice"
        );
    }
    out
}

/// The mount path of the named volume in a container.
fn mount_path<'a>(c: &'a Value, volume: &str) -> &'a str {
    seq(c, "volumeMounts")
        .iter()
        .find(|m| s(m, "name") == volume)
        .map(|m| s(m, "mountPath"))
        .unwrap_or_else(|| panic!("{}: no mount of volume {volume}", s(c, "name")))
}

fn volume<'a>(pod: &'a Value, name: &str) -> &'a Value {
    seq(pod, "volumes")
        .iter()
        .find(|v| s(v, "name") == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// The example Secret's values by key.
fn example_secret() -> (String, BTreeMap<String, String>) {
    let secret = only_doc(&format!("{K8S}/secret.example.yaml"));
    assert_eq!(s(&secret, "kind"), "Secret");
    let data = at(&secret, "stringData")
        .as_mapping()
        .expect("stringData")
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_owned(),
                v.as_str().unwrap().to_owned(),
            )
        })
        .collect();
    (s(&secret, "metadata.name").to_owned(), data)
}

/// Loads the ConfigMap's config.toml the way a container would: its --config argument and
/// its environment, with the secrets taken from the example Secret.
fn load_pod_config(configmap: &Value, pod: &Value, container: &Value) -> Settings {
    let dir = tempfile::tempdir().unwrap();
    let cm_name = s(configmap, "metadata.name");
    assert_eq!(
        s(volume(pod, "config"), "configMap.name"),
        cm_name,
        "the config volume mounts the ConfigMap"
    );
    let args = strings(container, "args");
    let cli = parse_cli(&args);
    let config_arg = cli.config.clone().expect("--config is given");
    let mount = mount_path(container, "config");
    let file_name = config_arg
        .strip_prefix(mount)
        .unwrap_or_else(|_| panic!("--config {config_arg:?} is not under the mount {mount}"));
    let key = file_name.to_str().unwrap();
    let config_file = dir.path().join("config.toml");
    let content = at(configmap, "data")
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("the ConfigMap has no data key {key}"));
    std::fs::write(&config_file, content).unwrap();

    let (secret_name, secret) = example_secret();
    let mut env = Vec::new();
    for (name, value) in env_of(container) {
        let value = match value.strip_prefix("secret:") {
            Some(reference) => {
                let (sname, skey) = reference.split_once('/').unwrap();
                assert_eq!(sname, secret_name, "{name} reads the Secret {secret_name}");
                secret
                    .get(skey)
                    .unwrap_or_else(|| panic!("{name}: key {skey} is not in the example Secret"))
                    .clone()
            }
            None => value,
        };
        if name == "IMPRINT_SYNC__API__KEY_FILE" {
            // The secret volume, written where the container would see it.
            let mount = mount_path(container, "api-key");
            let rel = Path::new(&value)
                .strip_prefix(mount)
                .unwrap_or_else(|_| panic!("api.key_file {value} is not under {mount}"));
            let items = seq(volume(pod, "api-key"), "secret.items");
            let item = items
                .iter()
                .find(|i| Path::new(s(i, "path")) == rel)
                .expect("the key file is one of the secret volume's items");
            let local = dir.path().join("api-key");
            std::fs::write(&local, &secret[s(item, "key")]).unwrap();
            env.push((name, local.to_str().unwrap().to_owned()));
        } else {
            env.push((name, value));
        }
    }
    Settings::load_from(Some(&config_file), env)
        .unwrap_or_else(|e| panic!("the pod's configuration does not load: {e}"))
}

#[test]
fn kustomization_lists_existing_files_and_keeps_secrets_and_jobs_out() {
    let k = kustomization();
    assert!(!k.resources.is_empty());
    for file in &k.resources {
        let path = repo(&format!("{K8S}/{file}"));
        assert!(
            path.is_file(),
            "kustomization.yaml lists {file}, which does not exist"
        );
        for doc in yaml_docs(&format!("{K8S}/{file}")) {
            assert!(
                doc.get("apiVersion").and_then(Value::as_str).is_some(),
                "{file}: apiVersion"
            );
            assert!(
                doc.get("kind").and_then(Value::as_str).is_some(),
                "{file}: kind"
            );
            assert!(
                doc.get("metadata").and_then(|m| m.get("name")).is_some(),
                "{file}: metadata.name"
            );
        }
    }
    // Applying the kustomization must never overwrite real credentials with placeholders,
    // and must never hold an immutable Job template (replays are a suspended CronJob).
    assert!(repo(&format!("{K8S}/secret.example.yaml")).is_file());
    assert!(!k.resources.iter().any(|r| r == "secret.example.yaml"));
    let objects = deployed_objects();
    for (file, o) in &objects {
        assert_ne!(
            s(o, "kind"),
            "Secret",
            "{file}: no Secret in the applied set"
        );
        assert_ne!(s(o, "kind"), "Job", "{file}: no Job in the applied set");
    }
    // Every YAML file of the directory parses and is either listed or one of the two above.
    for entry in std::fs::read_dir(repo(K8S)).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".yaml") || name.ends_with(".yml") {
            assert!(
                !yaml_docs(&format!("{K8S}/{name}")).is_empty(),
                "{name} is empty"
            );
            assert!(
                name == "kustomization.yaml"
                    || k.resources.contains(&name)
                    || name == "secret.example.yaml",
                "{name} is neither listed in kustomization.yaml nor documented as kept out"
            );
        }
    }
}

#[test]
fn deployment_runs_two_hardened_probed_replicas() {
    let objects = deployed_objects();
    let k = kustomization();
    let d = one_of_kind(&objects, "Deployment");
    assert_eq!(s(&d, "apiVersion"), "apps/v1");
    assert_eq!(at(&d, "spec.replicas").as_i64(), Some(2));
    let pod = at(&d, "spec.template.spec");
    assert_pod_hardened(pod);

    let containers = seq(pod, "containers");
    assert_eq!(containers.len(), 1, "one container");
    let c = &containers[0];
    assert_container_hardened(c);
    let (image_name, _) = pinned_image(&k.kustomization);
    assert_eq!(
        s(c, "image"),
        image_name,
        "the image is set by the kustomization"
    );

    // The command: `--config <file> run`, as the daemon's own parser reads it.
    let cli = parse_cli(&strings(c, "args"));
    match cli.command {
        Cmd::Run(run) => assert!(!run.once && !run.replay_failed && !run.dry_run),
        other => panic!("the container must run the daemon, not {other:?}"),
    }

    // The admin port, named, and the probes on it.
    let ports = seq(c, "ports");
    let admin = ports
        .iter()
        .find(|p| s(p, "name") == "admin")
        .expect("a port named admin");
    assert_eq!(at(admin, "containerPort").as_i64(), Some(9187));
    assert_eq!(s(at(c, "readinessProbe"), "httpGet.path"), "/readyz");
    assert_eq!(s(at(c, "livenessProbe"), "httpGet.path"), "/livez");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(s(at(c, probe), "httpGet.port"), "admin", "{probe} port");
    }
    let env = env_of(c);
    assert_eq!(
        env.get("IMPRINT_SYNC__ADMIN__LISTEN").map(String::as_str),
        Some("0.0.0.0:9187"),
        "the admin server must listen beyond loopback for the probes"
    );

    // Prometheus scrape annotations point at the admin port.
    let ann = at(&d, "spec.template.metadata.annotations");
    let annotation = |key: &str| ann.get(key).and_then(Value::as_str).unwrap_or_default();
    assert_eq!(annotation("prometheus.io/scrape"), "true");
    assert_eq!(annotation("prometheus.io/port"), "9187");
    assert_eq!(annotation("prometheus.io/path"), "/metrics");

    // Secrets: DATABASE_URL by secretKeyRef, the API key as a mounted file for api.key_file.
    let (secret_name, secret) = example_secret();
    assert_eq!(
        env.get("DATABASE_URL").map(String::as_str),
        Some(format!("secret:{secret_name}/database-url").as_str())
    );
    assert_eq!(s(volume(pod, "api-key"), "secret.secretName"), secret_name);
    let key_file = &env["IMPRINT_SYNC__API__KEY_FILE"];
    assert!(key_file.starts_with(mount_path(c, "api-key")));
    assert!(
        !env.contains_key("IMPRINT_SYNC__API__KEY"),
        "the key is a file, not an env value"
    );
    assert!(secret.contains_key("api-key"));

    // The configuration the pod would load is valid, has a key, and the grace fits.
    let configmap = one_of_kind(&objects, "ConfigMap");
    let settings = load_pod_config(&configmap, pod, c);
    settings
        .require(Needs::ApiKey)
        .expect("the pod's configuration has an API key");
    assert_eq!(settings.admin.listen, "0.0.0.0:9187");
    let grace_s = at(pod, "terminationGracePeriodSeconds").as_u64().unwrap();
    assert!(
        grace_s > 10,
        "terminationGracePeriodSeconds {grace_s} must exceed 10"
    );
    assert!(
        grace_s * 1000 > settings.sync.shutdown_grace_ms + 5_000,
        "terminationGracePeriodSeconds ({grace_s}s) must exceed sync.shutdown_grace_ms ({} ms) with room to spare",
        settings.sync.shutdown_grace_ms
    );
}

#[test]
fn deployment_migrates_first_with_the_migrator_role() {
    let objects = deployed_objects();
    let d = one_of_kind(&objects, "Deployment");
    let pod = at(&d, "spec.template.spec");
    let inits = seq(pod, "initContainers");
    assert_eq!(inits.len(), 1);
    let init = &inits[0];
    assert_container_hardened(init);
    let args = strings(init, "args");
    assert!(args.contains(&"migrate".to_owned()), "{args:?}");
    assert!(matches!(parse_cli(&args).command, Cmd::Migrate));
    assert_eq!(
        s(init, "image"),
        s(at(pod, "containers.0"), "image"),
        "same image"
    );

    let (secret_name, _) = example_secret();
    let env = env_of(init);
    assert_eq!(
        env.get("DATABASE_URL").map(String::as_str),
        Some(format!("secret:{secret_name}/migrator-database-url").as_str()),
        "migrations run as the schema owner, not as the daemon"
    );
    // migrate sends nothing: the init container neither gets nor needs the API key.
    assert!(!env.keys().any(|k| k.starts_with("IMPRINT_SYNC__API__KEY")));
    let configmap = one_of_kind(&objects, "ConfigMap");
    let settings = load_pod_config(&configmap, pod, init);
    assert!(settings.api.key.is_none());
    assert!(settings.database.url.contains("imprint_sync_migrator"));
}

#[test]
fn pdb_and_service_select_the_daemon_pods() {
    let objects = deployed_objects();
    let d = one_of_kind(&objects, "Deployment");
    let pod_labels = at(&d, "spec.template.metadata.labels")
        .as_mapping()
        .unwrap();
    let selects = |selector: &Value| {
        let sel = selector.as_mapping().expect("a selector");
        assert!(!sel.is_empty());
        sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
    };
    assert!(selects(at(&d, "spec.selector.matchLabels")));

    let pdb = one_of_kind(&objects, "PodDisruptionBudget");
    assert_eq!(s(&pdb, "apiVersion"), "policy/v1");
    assert_eq!(at(&pdb, "spec.minAvailable").as_i64(), Some(1));
    // Unready pods (database down, key rejected) must not block a node drain.
    assert_eq!(s(&pdb, "spec.unhealthyPodEvictionPolicy"), "AlwaysAllow");
    assert!(
        selects(at(&pdb, "spec.selector.matchLabels")),
        "the PDB covers the pods"
    );
    assert!(
        at(&pdb, "spec.minAvailable").as_i64() < at(&d, "spec.replicas").as_i64(),
        "a drain must be able to evict one replica"
    );

    let svc = one_of_kind(&objects, "Service");
    assert!(selects(at(&svc, "spec.selector")));
    assert_eq!(s(at(&svc, "spec.ports.0"), "targetPort"), "admin");
}

/// A Job spec that runs once (no retry: a replay would replay twice, a reconcile exit 1 reports
/// drift) in a hardened pod; returns the pod spec and its container.
fn one_shot_pod(job_spec: &Value) -> (&Value, &Value) {
    assert_eq!(
        at(job_spec, "backoffLimit").as_i64(),
        Some(0),
        "never run twice"
    );
    let pod = at(job_spec, "template.spec");
    assert_eq!(s(pod, "restartPolicy"), "Never");
    assert_pod_hardened(pod);
    let c = &seq(pod, "containers")[0];
    assert_container_hardened(c);
    (pod, c)
}

#[test]
fn replay_cronjob_is_suspended_in_the_kustomization_and_replays_once() {
    let objects = deployed_objects();
    let cron = from_file(&objects, "replay-failed-cronjob.yaml");
    assert_eq!(s(&cron, "apiVersion"), "batch/v1");
    // Never fires by itself: a replay is made from it with `kubectl create job --from=...`.
    assert_eq!(at(&cron, "spec.suspend").as_bool(), Some(true));
    assert_eq!(s(&cron, "spec.concurrencyPolicy"), "Forbid");
    let job = at(&cron, "spec.jobTemplate.spec");
    assert_eq!(
        at(job, "backoffLimit").as_i64(),
        Some(0),
        "never replay twice"
    );
    let pod = at(job, "template.spec");
    assert_eq!(s(pod, "restartPolicy"), "Never");
    assert_pod_hardened(pod);
    let c = &seq(pod, "containers")[0];
    assert_container_hardened(c);

    let args = strings(c, "args");
    let tail: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .skip_while(|a| *a != "run")
        .collect();
    assert_eq!(tail, ["run", "--replay-failed", "--once"]);
    match parse_cli(&args).command {
        Cmd::Run(run) => assert!(run.replay_failed && run.once && !run.dry_run),
        other => panic!("the CronJob must run `run --replay-failed --once`, not {other:?}"),
    }
    // The kustomization's image pin applies: the same image name as the Deployment's.
    let (name, _) = pinned_image(&kustomization().kustomization);
    assert_eq!(s(c, "image"), name);
    // The filtered example in the file's comment parses as a replay.
    let text = read(&format!("{K8S}/replay-failed-cronjob.yaml"));
    assert!(text.contains("create job --from=cronjob/imprint-sync-replay-failed"));
    let mut filtered = args.clone();
    filtered.extend(["--code".into(), "CUSTOMER_NOT_FOUND_ERROR".into()]);
    assert!(text.contains(r#"args += ["--code", "CUSTOMER_NOT_FOUND_ERROR"]"#));
    match parse_cli(&filtered).command {
        Cmd::Run(run) => assert_eq!(run.filter.codes, ["CUSTOMER_NOT_FOUND_ERROR"]),
        other => panic!("{other:?}"),
    }

    // Replaying sends requests: the same config, key file and daemon role as the Deployment.
    let configmap = one_of_kind(&objects, "ConfigMap");
    let settings = load_pod_config(&configmap, pod, c);
    settings
        .require(Needs::ApiKey)
        .expect("the Job has an API key");
    assert!(settings.database.url.contains("imprint_sync_daemon"));
    // Not selected by the PDB or the Service (it is not a daemon replica).
    let component = at(job, "template.metadata.labels")
        .get("app.kubernetes.io/component")
        .and_then(Value::as_str);
    assert_eq!(component, Some("replay-failed"));
}

/// The monitoring component: a ServiceMonitor on the admin Service's port, and a
/// PrometheusRule whose groups are deploy/monitoring/rules.yaml's.
#[test]
fn monitoring_component_scrapes_the_admin_port_and_carries_the_rules_file() {
    let dir = format!("{K8S}/monitoring");
    let k = only_doc(&format!("{dir}/kustomization.yaml"));
    assert_eq!(s(&k, "kind"), "Component");
    let files = strings(&k, "resources");
    let objects: Vec<Value> = files
        .iter()
        .flat_map(|f| yaml_docs(&format!("{dir}/{f}")))
        .collect();
    let of_kind = |kind: &str| {
        objects
            .iter()
            .find(|o| s(o, "kind") == kind)
            .unwrap_or_else(|| panic!("no {kind} in the component"))
    };
    let monitor = of_kind("ServiceMonitor");
    let svc = one_of_kind(&deployed_objects(), "Service");
    let svc_labels = at(&svc, "metadata.labels").as_mapping().unwrap();
    let wanted = at(monitor, "spec.selector.matchLabels")
        .as_mapping()
        .unwrap();
    assert!(wanted.iter().all(|(k, v)| svc_labels.get(k) == Some(v)));
    let endpoint = &seq(monitor, "spec.endpoints")[0];
    assert_eq!(s(endpoint, "port"), s(at(&svc, "spec.ports.0"), "name"));
    assert_eq!(s(endpoint, "path"), "/metrics");

    let rule = of_kind("PrometheusRule");
    let rules = only_doc("deploy/monitoring/rules.yaml");
    assert_eq!(
        at(rule, "spec.groups"),
        at(&rules, "groups"),
        "regenerate: deploy/monitoring/prometheusrule.sh > {dir}/prometheusrule.yaml"
    );
}

#[test]
fn example_secret_is_visibly_a_placeholder() {
    let (_, secret) = example_secret();
    let keys: Vec<&str> = secret.keys().map(String::as_str).collect();
    assert_eq!(keys, ["api-key", "database-url", "migrator-database-url"]);
    for (k, v) in &secret {
        assert!(
            v.contains("REPLACE-ME"),
            "{k} must be an obvious placeholder"
        );
    }
    assert!(read(&format!("{K8S}/secret.example.yaml")).contains("EXAMPLE ONLY"));
}

/// `kubectl kustomize` renders the directory, where kubectl is installed (no cluster needed).
#[test]
fn kustomize_renders_where_kubectl_exists() {
    let Ok(out) = Command::new("kubectl")
        .args(["kustomize", repo(K8S).to_str().unwrap()])
        .output()
    else {
        println!("SKIPPED: kubectl is not installed; the manifests were checked by parsing only");
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl kustomize failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, pinned) = pinned_image(&kustomization().kustomization);
    // The init container, the daemon, the replay and the reconcile CronJobs get the pinned image.
    assert_eq!(
        stdout.matches(&format!("image: {pinned}")).count(),
        4,
        "{stdout}"
    );
    let rendered: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&stdout)
        .map(|d| Value::deserialize(d).unwrap())
        .collect();
    let kinds: Vec<&str> = rendered.iter().map(|o| s(o, "kind")).collect();
    for kind in [
        "ConfigMap",
        "CronJob",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
}

#[test]
fn reconcile_cronjob_repairs_nightly_as_the_daemon_role() {
    let objects = deployed_objects();
    let cron = from_file(&objects, "reconcile-cronjob.yaml");
    assert!(!s(&cron, "spec.schedule").is_empty());
    assert_eq!(s(&cron, "spec.concurrencyPolicy"), "Forbid");
    let (pod, c) = one_shot_pod(at(&cron, "spec.jobTemplate.spec"));
    match parse_cli(&strings(c, "args")).command {
        Cmd::Reconcile(r) => assert!(r.repair && r.customer.is_empty() && r.limit.is_none()),
        other => panic!("the CronJob must run `reconcile --repair`, not {other:?}"),
    }
    let (image_name, _) = pinned_image(&kustomization().kustomization);
    assert_eq!(
        s(c, "image"),
        image_name,
        "the image is set by the kustomization"
    );
    let configmap = one_of_kind(&objects, "ConfigMap");
    let settings = load_pod_config(&configmap, pod, c);
    settings
        .require(Needs::ApiKey)
        .expect("the CronJob has an API key");
    assert!(settings.database.url.contains("imprint_sync_daemon"));
    let component = at(&cron, "spec.jobTemplate.spec.template.metadata.labels")
        .get("app.kubernetes.io/component")
        .and_then(Value::as_str);
    assert_eq!(
        component,
        Some("reconcile"),
        "not selected as a daemon replica"
    );
}

// ---------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------

const UNIT: &str = "deploy/systemd/imprint-sync.service";

/// `[Section] Key` → every value assigned, in order (continuation lines are not used).
fn unit_directives(text: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        assert!(!line.ends_with('\\'), "keep directives on one line: {line}");
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a directive: {line}"));
        out.entry((section.clone(), k.trim().to_owned()))
            .or_default()
            .push(v.trim().to_owned());
    }
    out
}

fn service_value(d: &BTreeMap<(String, String), Vec<String>>, key: &str) -> String {
    let values = d
        .get(&("Service".to_owned(), key.to_owned()))
        .unwrap_or_else(|| panic!("[Service] {key}= is missing"));
    values.last().unwrap().clone()
}

fn seconds(v: &str) -> u64 {
    let v = v.trim();
    if let Some(n) = v.strip_suffix("min") {
        n.parse::<u64>().unwrap() * 60
    } else {
        v.trim_end_matches('s')
            .parse()
            .unwrap_or_else(|_| panic!("not seconds: {v}"))
    }
}

/// KEY=VALUE lines of an environment file (comments and blanks skipped).
fn env_file(rel: &str) -> Vec<(String, String)> {
    read(rel)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{rel}: not KEY=VALUE: {l}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

#[test]
fn systemd_unit_notifies_restarts_sanely_and_is_hardened() {
    let d = unit_directives(&read(UNIT));
    let v = |k: &str| service_value(&d, k);

    assert_eq!(v("Type"), "notify");
    assert_eq!(v("NotifyAccess"), "main");
    assert!(seconds(&v("WatchdogSec")) > 0);
    assert_eq!(v("Restart"), "on-failure");
    assert!(
        v("RestartPreventExitStatus")
            .split_whitespace()
            .any(|c| c == "64"),
        "exit 64 (bad configuration) must not be restarted"
    );
    assert_eq!(v("EnvironmentFile"), "/etc/imprint-sync/env");

    let start = v("ExecStart");
    let start_args: Vec<String> = start
        .split_whitespace()
        .skip(1)
        .map(str::to_owned)
        .collect();
    assert!(start.starts_with("/usr/local/bin/imprint-sync "), "{start}");
    assert!(
        matches!(parse_cli(&start_args).command, Cmd::Run(_)),
        "{start}"
    );
    let pre = v("ExecStartPre");
    let pre_args: Vec<String> = pre
        .split_whitespace()
        .skip_while(|w| *w != "/usr/local/bin/imprint-sync")
        .skip(1)
        .map(str::to_owned)
        .collect();
    assert!(
        matches!(parse_cli(&pre_args).command, Cmd::Migrate),
        "{pre}"
    );
    assert_eq!(
        parse_cli(&pre_args).config,
        parse_cli(&start_args).config,
        "migrate and run read the same file"
    );

    // Every ${VAR} the unit expands is defined by the example environment file.
    let env = env_file("deploy/systemd/env.example");
    for line in read(UNIT)
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
    {
        for var in line
            .split("${")
            .skip(1)
            .map(|r| r.split('}').next().unwrap())
        {
            assert!(
                env.iter().any(|(k, _)| k == var),
                "${{{var}}} is not in env.example"
            );
        }
    }

    // The grace: TimeoutStopSec above sync.shutdown_grace_ms of the example configuration.
    let settings = Settings::load_from(Some(&repo("deploy/systemd/config.toml.example")), env)
        .unwrap_or_else(|e| panic!("config.toml.example with env.example does not load: {e}"));
    settings
        .require(Needs::ApiKey)
        .expect("env.example has a key");
    let stop_ms = seconds(&v("TimeoutStopSec")) * 1000;
    assert!(
        stop_ms > settings.sync.shutdown_grace_ms + 5_000,
        "TimeoutStopSec ({stop_ms} ms) must exceed sync.shutdown_grace_ms ({} ms)",
        settings.sync.shutdown_grace_ms
    );
    assert!(
        settings.admin_listen().unwrap().ip().is_loopback(),
        "the host default stays on loopback"
    );

    let hardening = [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("SystemCallArchitectures", "native"),
        ("LockPersonality", "yes"),
        ("RestrictNamespaces", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("MemoryMax", "256M"),
    ];
    for (key, want) in hardening {
        assert_eq!(v(key), want, "[Service] {key}");
    }
    assert!(
        v("DynamicUser") == "yes" || d.contains_key(&("Service".into(), "User".into())),
        "a dynamic or dedicated user"
    );
    let filters = &d[&("Service".to_owned(), "SystemCallFilter".to_owned())];
    assert_eq!(filters[0], "@system-service");
}

/// The migration's guard: with MIGRATOR_DATABASE_URL empty, the first ExecStartPre exits 64
/// naming the variable, before `migrate` could fall back to the built-in default database.
#[test]
fn systemd_migration_refuses_an_empty_migrator_url() {
    let d = unit_directives(&read(UNIT));
    let pres = &d[&("Service".to_owned(), "ExecStartPre".to_owned())];
    assert_eq!(pres.len(), 2, "the guard, then migrate: {pres:?}");
    let guard = pres[0]
        .strip_prefix("/bin/sh -c '")
        .and_then(|g| g.strip_suffix('\''))
        .unwrap_or_else(|| panic!("the guard is one sh -c '...': {}", pres[0]));
    // systemd turns $$ into $ before the shell sees it.
    let script = guard.replace("$$", "$");
    let run = |url: &str| {
        Command::new("/bin/sh")
            .args(["-c", &script])
            .env_clear()
            .env("MIGRATOR_DATABASE_URL", url)
            .output()
            .expect("running the guard")
    };
    let empty = run("");
    assert_eq!(empty.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&empty.stderr).contains("MIGRATOR_DATABASE_URL is empty"));
    let set = run("postgres://imprint_sync_migrator@db/partner");
    assert_eq!(set.status.code(), Some(0), "{set:?}");
    assert!(pres[1].contains("DATABASE_URL=${MIGRATOR_DATABASE_URL}"));
}

/// Runs `systemd-analyze verify` on a copy of `unit_text` whose binary path points at the
/// test's own build of the binary (verify insists that ExecStart's file exists).
/// Returns the problems it reported about our unit, or None where systemd-analyze is absent.
fn systemd_verify(unit_text: &str) -> Option<Vec<String>> {
    systemd_verify_units(&[("imprint-sync.service", unit_text)])
}

/// `systemd_verify` of several units side by side (a timer and its service), by file name.
fn systemd_verify_units(units: &[(&str, &str)]) -> Option<Vec<String>> {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_imprint-sync");
    let paths: Vec<PathBuf> = units
        .iter()
        .map(|(name, text)| {
            let path = dir.path().join(name);
            std::fs::write(&path, text.replace("/usr/local/bin/imprint-sync", bin)).unwrap();
            path
        })
        .collect();
    let out = match Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&paths)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("running systemd-analyze: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // verify also reports on the host's own units in some environments; keep what is ours.
    let mut problems: Vec<String> = text
        .lines()
        .filter(|l| l.contains("imprint-sync"))
        .map(str::to_owned)
        .collect();
    if !out.status.success() {
        problems.push(format!("exit status {}: {text}", out.status));
    }
    Some(problems)
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let unit = read(UNIT);
    let Some(problems) = systemd_verify(&unit) else {
        println!("SKIPPED: systemd-analyze is not installed; the unit was checked by parsing only");
        return;
    };
    assert!(problems.is_empty(), "systemd-analyze verify: {problems:#?}");

    // verify exits 0 on an unknown key, only warning: make sure such a warning is caught.
    let typo = unit.replace("LockPersonality=yes", "LockPersonalty=yes");
    let problems = systemd_verify(&typo).unwrap();
    assert!(
        problems.iter().any(|p| p.contains("LockPersonalty")),
        "a misspelled key must be reported: {problems:#?}"
    );
}

const RECONCILE_UNIT: &str = "deploy/systemd/imprint-sync-reconcile.service";
const RECONCILE_TIMER: &str = "deploy/systemd/imprint-sync-reconcile.timer";

#[test]
fn the_reconcile_timer_starts_a_nightly_repair_pass() {
    let timer = unit_directives(&read(RECONCILE_TIMER));
    let get = |d: &BTreeMap<(String, String), Vec<String>>, section: &str, key: &str| {
        d.get(&(section.to_owned(), key.to_owned()))
            .and_then(|v| v.last().cloned())
            .unwrap_or_else(|| panic!("[{section}] {key}= is missing"))
    };
    assert!(get(&timer, "Timer", "OnCalendar").contains("02:30"));
    assert_eq!(get(&timer, "Timer", "Persistent"), "true");
    assert_eq!(
        get(&timer, "Timer", "Unit"),
        "imprint-sync-reconcile.service"
    );
    assert_eq!(get(&timer, "Install", "WantedBy"), "timers.target");

    let unit = read(RECONCILE_UNIT);
    let service = unit_directives(&unit);
    assert_eq!(service_value(&service, "Type"), "oneshot");
    let exec = service_value(&service, "ExecStart");
    let args: Vec<String> = exec.split_whitespace().skip(1).map(str::to_owned).collect();
    match parse_cli(&args).command {
        Cmd::Reconcile(r) => assert!(r.repair),
        other => panic!("the unit must run `reconcile --repair`, not {other:?}"),
    }
    // The same secrets and configuration as the daemon's unit.
    let daemon = unit_directives(&read(UNIT));
    assert_eq!(
        service_value(&service, "EnvironmentFile"),
        service_value(&daemon, "EnvironmentFile")
    );
    assert_eq!(service_value(&service, "DynamicUser"), "yes");

    // systemd-analyze verify, on both units side by side.
    let timer_text = read(RECONCILE_TIMER);
    let Some(problems) = systemd_verify_units(&[
        ("imprint-sync-reconcile.service", &unit),
        ("imprint-sync-reconcile.timer", &timer_text),
    ]) else {
        println!(
            "SKIPPED: systemd-analyze is not installed; the units were checked by parsing only"
        );
        return;
    };
    assert!(problems.is_empty(), "systemd-analyze verify: {problems:#?}");
}

#[test]
fn systemd_analyze_security_rates_the_unit_ok() {
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("imprint-sync.service");
    let bin = env!("CARGO_BIN_EXE_imprint-sync");
    std::fs::write(
        &unit,
        read(UNIT).replace("/usr/local/bin/imprint-sync", bin),
    )
    .unwrap();
    // Exposure on systemd's 0–100 scale (its 0.0–10.0 shown times ten); 20 is "OK".
    let out = match Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
        .arg(&unit)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("SKIPPED: systemd-analyze is not installed");
            return;
        }
        Err(e) => panic!("running systemd-analyze: {e}"),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Unknown option") || String::from_utf8_lossy(&out.stderr).contains("--offline")
    {
        println!("SKIPPED: this systemd-analyze has no offline security analysis");
        return;
    }
    assert!(
        out.status.success(),
        "exposure above the threshold:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------
// The container image
// ---------------------------------------------------------------------------------------

#[test]
fn dockerfile_builds_locked_and_runs_nonroot_distroless() {
    let text = read("Dockerfile");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    let from: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(from.len(), 2, "two stages: {from:?}");
    assert!(from[0].starts_with("FROM rust:1-bookworm AS "));
    assert_eq!(from[1], "FROM gcr.io/distroless/cc-debian12:nonroot");
    assert!(text.contains("cargo build --release --locked"));
    assert!(lines.contains(&"USER 65532:65532") || lines.contains(&"USER 65532"));
    assert!(lines.contains(&r#"ENTRYPOINT ["imprint-sync"]"#));
    assert!(lines.contains(&r#"CMD ["run"]"#));
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("COPY --from=") && l.ends_with(" /usr/local/bin/imprint-sync"))
    );
    // The shipped defaults are found where the binary looks: ./config/default.toml.
    let workdir = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("WORKDIR "))
        .expect("a WORKDIR in the runtime stage");
    let expected = format!(" {workdir}/config/default.toml");
    assert!(
        lines.iter().any(|l| l.starts_with("COPY")
            && l.contains("config/default.toml")
            && l.ends_with(&expected)),
        "config/default.toml must be copied to {workdir}/config/default.toml"
    );

    // The build context keeps what the build needs.
    let ignore = read(".dockerignore");
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(patterns.contains(&"target/") && patterns.contains(&".git/"));
    for needed in ["src", "migrations", "config", "Cargo.toml", "Cargo.lock"] {
        assert!(
            !patterns
                .iter()
                .any(|p| p.trim_end_matches('/') == needed || p.trim_end_matches("/**") == needed),
            ".dockerignore must not exclude {needed}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Least privilege in the database
// ---------------------------------------------------------------------------------------

mod roles {
    use std::time::Duration;

    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    use sqlx::{ConnectOptions, Connection, Executor, PgConnection, PgPool};

    use super::read;
    use crate::common::TestDb;

    const INSUFFICIENT_PRIVILEGE: &str = "42501";

    /// A fresh, empty database (the harness's: dropped with it), and how to reach it as a role.
    struct Scratch {
        db: TestDb,
        opts: PgConnectOptions,
    }

    impl Scratch {
        async fn create() -> Self {
            let db = TestDb::empty().await;
            let opts = imprint_sync::db::connect_options(&db.url)
                .expect("the test database's URL")
                .log_statements(log::LevelFilter::Trace);
            Self { db, opts }
        }

        /// A pool on the scratch database whose connections act as `role` (SET ROLE keeps
        /// the test independent of pg_hba and passwords: privileges are those of the role).
        async fn pool_as(&self, role: &'static str) -> PgPool {
            PgPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(Duration::from_secs(10))
                .after_connect(move |conn, _| {
                    Box::pin(async move {
                        conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                            "SET ROLE {role}"
                        ))))
                        .await?;
                        Ok(())
                    })
                })
                .connect_with(self.opts.clone())
                .await
                .expect("connecting to the scratch database")
        }
    }

    /// Runs one statement as `role` on a fresh connection.
    async fn as_role(scratch: &Scratch, role: &str, sql: &str) -> Result<(), sqlx::Error> {
        let mut conn: PgConnection = scratch.opts.connect().await.expect("connect");
        conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SET ROLE {role}"
        ))))
        .await
        .expect("SET ROLE");
        let result = conn
            .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())))
            .await
            .map(|_| ());
        conn.close().await.ok();
        result
    }

    async fn allowed(scratch: &Scratch, role: &str, sql: &str) {
        if let Err(e) = as_role(scratch, role, sql).await {
            panic!("{role} must be allowed to: {sql}\n  but: {e}");
        }
    }

    async fn denied(scratch: &Scratch, role: &str, sql: &str) {
        match as_role(scratch, role, sql).await {
            Ok(()) => panic!("{role} must NOT be allowed to: {sql}"),
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some(INSUFFICIENT_PRIVILEGE) => {}
            Err(e) => panic!("{role}: {sql}\n  failed, but not for lack of privilege: {e}"),
        }
    }

    async fn run_roles_sql(pool: &PgPool) {
        pool.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(read(
            "deploy/sql/roles.sql",
        ))))
        .await
        .unwrap_or_else(|e| panic!("deploy/sql/roles.sql failed: {e}"));
    }

    /// A scratch database set up as the docs say: roles first (they may already exist:
    /// roles are cluster-wide), then the migrations as the migrator, then roles.sql again:
    /// idempotent, and it grants on the new tables. Returns a superuser and a migrator pool.
    async fn with_roles() -> (Scratch, PgPool, PgPool) {
        let scratch = Scratch::create().await;
        let superuser = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(scratch.opts.clone())
            .await
            .unwrap();
        run_roles_sql(&superuser).await;
        let migrator = scratch.pool_as("imprint_sync_migrator").await;
        imprint_sync::db::migrate(&migrator)
            .await
            .expect("the migrator role can apply every migration");
        run_roles_sql(&superuser).await;
        (scratch, superuser, migrator)
    }

    #[tokio::test]
    async fn roles_sql_grants_least_privilege() {
        let (scratch, superuser, migrator) = with_roles().await;

        // Everything in the schema belongs to the migrator.
        let owners: Vec<(String, String)> = sqlx::query_as(
            "SELECT c.relname::text, pg_get_userbyid(c.relowner)::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'imprint_sync' AND c.relkind IN ('r', 'S', 'p')",
        )
        .fetch_all(&superuser)
        .await
        .unwrap();
        assert!(
            owners.iter().any(|(t, _)| t == "customer_outbox"),
            "{owners:?}"
        );
        for (table, owner) in &owners {
            assert_eq!(owner, "imprint_sync_migrator", "owner of {table}");
        }
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'imprint_sync'",
        )
        .fetch_all(&superuser)
        .await
        .unwrap();

        // --- The partner's writers: insert into the outbox, nothing else. ---
        let w = "imprint_sync_writer";
        allowed(
            &scratch,
            w,
            "INSERT INTO imprint_sync.customer_outbox (customer_id, email, phone)
             VALUES ('BBB815E9-F654-438D-9AD3-3F7BB8136FC0', 'a@example.com', '+14155550100')",
        )
        .await;
        // An id too long for the outbox's indexes is stored under a marker (0007), with
        // the writer's privileges: the partner's insert never fails.
        allowed(
            &scratch,
            w,
            "INSERT INTO imprint_sync.customer_outbox (customer_id)
             VALUES (repeat('x', 100000))",
        )
        .await;
        denied(
            &scratch,
            w,
            "SELECT count(*) FROM imprint_sync.customer_outbox",
        )
        .await;
        denied(
            &scratch,
            w,
            "UPDATE imprint_sync.customer_outbox SET sync_status = 'synced'",
        )
        .await;
        denied(&scratch, w, "DELETE FROM imprint_sync.customer_outbox").await;
        denied(
            &scratch,
            w,
            "INSERT INTO imprint_sync.customer_outbox (customer_id) VALUES ('x') RETURNING id",
        )
        .await;
        denied(
            &scratch,
            w,
            "SELECT * FROM imprint_sync.customer_sync_state",
        )
        .await;
        denied(
            &scratch,
            w,
            "INSERT INTO imprint_sync.customer_sync_state (customer_id, last_synced_outbox_id, last_synced_at)
             VALUES ('x', 1, now())",
        )
        .await;
        denied(
            &scratch,
            w,
            "UPDATE imprint_sync.customer_sync_state SET drift = NULL",
        )
        .await;
        denied(&scratch, w, "DELETE FROM imprint_sync.customer_sync_state").await;
        denied(&scratch, w, "SELECT * FROM imprint_sync.sync_attempts").await;
        denied(&scratch, w, "CREATE TABLE imprint_sync.intruder (x int)").await;
        // The daemon's columns: a row inserted in flight without a lease wedged its customer;
        // an explicit id reordered or broke every later insert.
        for sql in [
            "INSERT INTO imprint_sync.customer_outbox (customer_id, sync_status) VALUES ('x', 'in_flight')",
            "INSERT INTO imprint_sync.customer_outbox (customer_id, sync_status) VALUES ('x', 'synced')",
            "INSERT INTO imprint_sync.customer_outbox (customer_id, lease_expires_at, leased_by)
             VALUES ('x', now() + interval '1 day', 'me')",
            "INSERT INTO imprint_sync.customer_outbox (customer_id, next_attempt_at)
             VALUES ('x', now() + interval '1 year')",
            "INSERT INTO imprint_sync.customer_outbox (customer_id, attempts) VALUES ('x', 99)",
            "INSERT INTO imprint_sync.customer_outbox (customer_id, superseded_by) VALUES ('x', 1)",
            "INSERT INTO imprint_sync.customer_outbox (customer_id, enqueued_at) VALUES ('x', 'infinity')",
            "INSERT INTO imprint_sync.customer_outbox (id, customer_id) OVERRIDING SYSTEM VALUE
             VALUES (9223372036854775000, 'x')",
        ] {
            denied(&scratch, w, sql).await;
        }
        // Without OVERRIDING, an explicit id is refused before privileges are looked at.
        let explicit_id = as_role(
            &scratch,
            w,
            "INSERT INTO imprint_sync.customer_outbox (id, customer_id) VALUES (5, 'x')",
        )
        .await
        .expect_err("an explicit id is refused");
        assert_eq!(
            explicit_id
                .as_database_error()
                .and_then(|e| e.code())
                .as_deref(),
            Some("428C9"),
            "generated_always: {explicit_id}"
        );
        for table in tables.iter().filter(|t| *t != "customer_outbox") {
            denied(&scratch, w, &format!("SELECT 1 FROM imprint_sync.{table}")).await;
        }

        // The shipped trigger on a partner's own table works with the writer's privileges.
        superuser
            .execute(
                "CREATE TABLE public.partner_customers (
                     id bigint PRIMARY KEY, imprint_customer_id text, email text, phone text);
                 CREATE TRIGGER partner_customers_imprint_sync
                     AFTER INSERT OR UPDATE ON public.partner_customers
                     FOR EACH ROW EXECUTE FUNCTION imprint_sync.enqueue_customer_change();
                 GRANT INSERT, UPDATE, SELECT ON public.partner_customers TO imprint_sync_writer;",
            )
            .await
            .unwrap();
        allowed(
            &scratch,
            w,
            "INSERT INTO public.partner_customers VALUES
                 (1, 'C8C1D1D4-9E61-4C43-9B1B-3E3C1A4F0E11', 'b@example.com', '+14155550101');
             UPDATE public.partner_customers SET phone = '+14155550102' WHERE id = 1;",
        )
        .await;
        let enqueued: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM imprint_sync.customer_outbox
              WHERE customer_id = 'C8C1D1D4-9E61-4C43-9B1B-3E3C1A4F0E11'",
        )
        .fetch_one(&superuser)
        .await
        .unwrap();
        assert_eq!(
            enqueued, 2,
            "the trigger enqueued the insert and the update"
        );

        // --- The daemon: rows of every table, no DDL. ---
        let daemon = scratch.pool_as("imprint_sync_daemon").await;
        imprint_sync::db::check_migrated(&daemon)
            .await
            .expect("the daemon can check the migrations");
        let d = "imprint_sync_daemon";
        allowed(
            &scratch,
            d,
            "UPDATE imprint_sync.customer_outbox
                SET sync_status = 'in_flight', leased_by = 'test', attempts = attempts + 1,
                    lease_expires_at = now() + interval '1 minute', updated_at = now()
              WHERE id = (SELECT min(id) FROM imprint_sync.customer_outbox)",
        )
        .await;
        allowed(
            &scratch,
            d,
            "INSERT INTO imprint_sync.customer_sync_state
                 (customer_id, last_synced_outbox_id, last_synced_at, response)
             VALUES ('BBB815E9-F654-438D-9AD3-3F7BB8136FC0', 1, now(), '{}')
             ON CONFLICT (customer_id) DO UPDATE SET last_synced_outbox_id = EXCLUDED.last_synced_outbox_id",
        )
        .await;
        allowed(
            &scratch,
            d,
            "INSERT INTO imprint_sync.sync_attempts
                 (outbox_id, customer_id, attempt, started_at, duration_ms, outcome, worker_id)
             VALUES (1, 'BBB815E9-F654-438D-9AD3-3F7BB8136FC0', 1, now(), 12, 'synced', 'test');
             DELETE FROM imprint_sync.sync_attempts WHERE started_at < now() - interval '14 days';
             DELETE FROM imprint_sync.customer_outbox WHERE sync_status = 'superseded';",
        )
        .await;
        allowed(&scratch, d, "LISTEN imprint_sync_outbox").await;
        for table in &tables {
            allowed(
                &scratch,
                d,
                &format!("SELECT count(*) FROM imprint_sync.{table}"),
            )
            .await;
        }
        denied(&scratch, d, "CREATE TABLE imprint_sync.intruder (x int)").await;
        denied(&scratch, d, "DROP TABLE imprint_sync.customer_outbox").await;
        denied(&scratch, d, "TRUNCATE imprint_sync.sync_attempts").await;
        denied(
            &scratch,
            d,
            "ALTER TABLE imprint_sync.customer_outbox ADD COLUMN x int",
        )
        .await;
        denied(&scratch, d, "SELECT * FROM public.partner_customers").await;
        // `reconcile --repair`: a row of the partner's columns (the profile Imprint accepted),
        // and the run's summary.
        allowed(
            &scratch,
            d,
            "INSERT INTO imprint_sync.customer_outbox (customer_id, email, metadata)
             VALUES ('BBB815E9-F654-438D-9AD3-3F7BB8136FC0', 'a@example.com', '{}') RETURNING id;
             INSERT INTO imprint_sync.reconcile_runs
                 (started_at, repair, checked, in_step, drifted, missing, errors, repaired)
             VALUES (now(), true, 1, 0, 1, 0, 0, 1);
             UPDATE imprint_sync.customer_sync_state
                SET checked_at = now(), verified_at = now(), reconcile_result = 'drifted'",
        )
        .await;
        // Only what the daemon does: none of its own columns in a new outbox row, no rewriting
        // the migrations, no deleting Imprint's view, no rewriting the attempt log or the runs.
        for sql in [
            "INSERT INTO imprint_sync.customer_outbox (customer_id, sync_status) VALUES ('x', 'synced')",
            "INSERT INTO imprint_sync.customer_outbox (customer_id, superseded_by) VALUES ('x', 1)",
            "DELETE FROM imprint_sync.reconcile_runs",
            "UPDATE imprint_sync._sqlx_migrations SET success = false",
            "DELETE FROM imprint_sync._sqlx_migrations",
            "INSERT INTO imprint_sync._sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES (999, 'x', true, '\\x00', 0)",
            "DELETE FROM imprint_sync.customer_sync_state",
            "DELETE FROM imprint_sync.customer_claims",
            "UPDATE imprint_sync.sync_attempts SET outcome = 'synced'",
            "SELECT nextval(pg_get_serial_sequence('imprint_sync.customer_outbox', 'id'))",
        ] {
            denied(&scratch, d, sql).await;
        }

        // --- A table a later migration adds is covered by the default privileges. ---
        allowed(
            &scratch,
            "imprint_sync_migrator",
            "CREATE TABLE imprint_sync.later_table (id bigserial PRIMARY KEY, note text)",
        )
        .await;
        allowed(
            &scratch,
            d,
            "INSERT INTO imprint_sync.later_table (note) VALUES ('x');
             UPDATE imprint_sync.later_table SET note = 'y';
             DELETE FROM imprint_sync.later_table;",
        )
        .await;
        denied(
            &scratch,
            w,
            "INSERT INTO imprint_sync.later_table (note) VALUES ('x')",
        )
        .await;

        daemon.close().await;
        migrator.close().await;
        superuser.close().await;
    }

    /// With the shipped grants, the partner's ordinary inserts (and the trigger's) work, and
    /// `run --once` logged in as the daemon role drains them: every statement the daemon
    /// makes (claim, write-back, attempt log, heartbeat, retention, status) is granted.
    #[tokio::test]
    async fn the_daemon_role_drains_what_the_writer_role_inserts() {
        let (scratch, superuser, migrator) = with_roles().await;
        migrator.close().await;

        let customers: Vec<String> = (1..=3).map(|n| super::common::customer_id(1, n)).collect();
        for (n, c) in customers.iter().enumerate() {
            allowed(
                &scratch,
                "imprint_sync_writer",
                &format!(
                    "INSERT INTO imprint_sync.customer_outbox (customer_id, email, phone)
                     VALUES ('{c}', 'u{n}@example.com', '+1415555010{n}')"
                ),
            )
            .await;
        }

        let sandbox = super::common::sandbox(Default::default()).await;
        let mut url = url::Url::parse(&scratch.db.url).unwrap();
        url.set_username("imprint_sync_daemon").unwrap();
        let _ = url.set_password(None);
        let env = super::common::test_env(url.as_str(), &sandbox.base_url());
        let mut run = super::common::Daemon::start(&["run", "--once"], &env);
        assert_eq!(
            run.exit_code(60).await,
            0,
            "run --once as imprint_sync_daemon: {}",
            run.stderr()
        );
        let synced: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM imprint_sync.customer_outbox WHERE sync_status = 'synced'",
        )
        .fetch_one(&superuser)
        .await
        .unwrap();
        assert_eq!(synced, 3, "{}", run.stderr());
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let out = super::common::run_binary(&["status"], &env);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            super::common::output_text(&out)
        );
        superuser.close().await;
    }
}

// ---------------------------------------------------------------------------------------
// TLS to PostgreSQL
// ---------------------------------------------------------------------------------------

mod tls {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use imprint_sync::config::Settings;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };

    use super::common::{API_KEY, Daemon, output_text, run_binary};

    const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

    /// A throwaway CA: its certificate (PEM) and the issuer that signs server certificates.
    fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    }

    fn as_postgres(program: &str, args: &[&str]) {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{PG_BIN}/{program}")])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {program} as postgres: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A PostgreSQL cluster of its own with `ssl = on` and a server certificate for
    /// `localhost` signed by a CA made here; stopped and removed on drop (a panic included).
    struct TlsCluster {
        dir: tempfile::TempDir,
        data: PathBuf,
        port: u16,
    }

    impl TlsCluster {
        fn start() -> Self {
            Self::start_with(|_| {})
        }

        /// Like [`TlsCluster::start`], with the server certificate's parameters adjusted
        /// (an expired one, say).
        fn start_with(adjust: impl FnOnce(&mut CertificateParams)) -> Self {
            let dir = tempfile::Builder::new()
                .prefix("imprint-sync-tls-")
                .tempdir()
                .unwrap();
            let data = dir.path().join("data");
            let chown = |path: &Path| {
                let ok = Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(path)
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "chown {}", path.display());
            };
            chown(dir.path());
            as_postgres(
                "initdb",
                &[
                    "-D",
                    data.to_str().unwrap(),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                ],
            );
            let ca = ca("imprint-sync test CA");
            std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
            std::fs::write(
                dir.path().join("wrong-ca.pem"),
                self::ca("someone else's CA").pem(),
            )
            .unwrap();
            let server_key = KeyPair::generate().unwrap();
            let mut params =
                CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                    .unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, "localhost");
            adjust(&mut params);
            let cert = params.signed_by(&server_key, &ca).unwrap();
            std::fs::write(data.join("server.crt"), cert.pem()).unwrap();
            std::fs::write(data.join("server.key"), server_key.serialize_pem()).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                data.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let conf = format!(
                "\nport = {port}\nlisten_addresses = 'localhost'\n\
                 unix_socket_directories = '{}'\nssl = on\n\
                 ssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
                dir.path().display()
            );
            let mut pg_conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
            pg_conf.push_str(&conf);
            std::fs::write(data.join("postgresql.conf"), pg_conf).unwrap();
            chown(dir.path());
            let cluster = Self { dir, data, port };
            let log = cluster.dir.path().join("server.log");
            as_postgres(
                "pg_ctl",
                &[
                    "-D",
                    cluster.data.to_str().unwrap(),
                    "-l",
                    log.to_str().unwrap(),
                    "-w",
                    "start",
                ],
            );
            cluster
        }

        /// The URL of the cluster's postgres database, checking the certificate against `ca`.
        fn url(&self, ca: &str) -> String {
            format!(
                "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
                self.port,
                self.dir.path().join(ca).display()
            )
        }
    }

    impl Drop for TlsCluster {
        fn drop(&mut self) {
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--", &format!("{PG_BIN}/pg_ctl")])
                .args(["-D", self.data.to_str().unwrap(), "-m", "immediate", "stop"])
                .output();
        }
    }

    /// The shipped URLs say `sslmode=verify-full`: the daemon connects over TLS and checks the
    /// server's certificate; a certificate from another CA, or a CA file that is not there,
    /// is a configuration error (exit 64 naming database.url), never retried.
    #[tokio::test]
    async fn verify_full_connects_over_tls_and_a_wrong_ca_exits_64() {
        let cluster = TlsCluster::start();
        let url = cluster.url("ca.pem");

        let out = run_binary(&["migrate"], &[("DATABASE_URL", &url)]);
        assert_eq!(out.status.code(), Some(0), "migrate: {}", output_text(&out));
        let out = run_binary(&["status", "--json"], &[("DATABASE_URL", &url)]);
        assert_eq!(out.status.code(), Some(0), "status: {}", output_text(&out));

        // The daemon's own pool: TLS, and the session settings every connection carries.
        let settings = Settings::load_from(None, [("DATABASE_URL".to_owned(), url.clone())])
            .expect("the TLS URL is valid configuration");
        let pool = imprint_sync::db::pool(&settings.database).unwrap();
        let (ssl, statement, lock, idle): (bool, String, String, String) = sqlx::query_as(
            "SELECT (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()),
                    current_setting('statement_timeout'), current_setting('lock_timeout'),
                    current_setting('tcp_keepalives_idle')",
        )
        .fetch_one(&pool)
        .await
        .expect("querying over TLS");
        assert!(
            ssl,
            "pg_stat_ssl.ssl must be true for the daemon's connection"
        );
        assert_eq!(
            (statement.as_str(), lock.as_str(), idle.as_str()),
            ("30s", "5s", "30"),
            "statement_timeout, lock_timeout, tcp_keepalives_idle"
        );
        pool.close().await;

        for (ca, what) in [
            ("wrong-ca.pem", "a certificate from another CA"),
            ("missing-ca.pem", "a CA file that does not exist"),
        ] {
            let bad = cluster.url(ca);
            for args in [&["status"][..], &["migrate"][..]] {
                let out = run_binary(args, &[("DATABASE_URL", &bad)]);
                let text = output_text(&out);
                assert_eq!(out.status.code(), Some(64), "{args:?} with {what}: {text}");
                assert!(
                    text.contains("`database.url`"),
                    "{args:?} with {what}: {text}"
                );
            }
            let out = run_binary(&["status"], &[("DATABASE_URL", &bad)]);
            if ca == "wrong-ca.pem" {
                let text = output_text(&out);
                assert!(
                    text.contains("TLS") && text.contains("certificate"),
                    "the error says the certificate did not verify: {text}"
                );
            }
            // `run` used to retry a TLS failure forever; now it stops at start.
            let env = vec![
                ("DATABASE_URL".to_owned(), bad.clone()),
                ("IMPRINT_SYNC__API__KEY".to_owned(), API_KEY.to_owned()),
                (
                    "IMPRINT_SYNC__API__BASE_URL".to_owned(),
                    "http://127.0.0.1:9".to_owned(),
                ),
                (
                    "IMPRINT_SYNC__ADMIN__LISTEN".to_owned(),
                    "127.0.0.1:0".to_owned(),
                ),
            ];
            let mut daemon = Daemon::start(&["run", "--once"], &env);
            assert_eq!(
                daemon.exit_code(30).await,
                64,
                "run with {what}: {}",
                daemon.stderr()
            );
            assert!(
                daemon.stderr().contains("`database.url`"),
                "{}",
                daemon.stderr()
            );
        }
    }

    /// `sslmode=verify-ca` (the CA is checked, not the host name) is a libpq mode the docs
    /// accept: it panicked at the first connection (rustls could not pick a crypto provider
    /// with both compiled in), exit 101 for status, migrate and run (adversarial review).
    #[tokio::test]
    async fn verify_ca_connects_over_tls() {
        let cluster = TlsCluster::start();
        let url = cluster
            .url("ca.pem")
            .replace("@localhost:", "@127.0.0.1:")
            .replace("verify-full", "verify-ca");
        for args in [&["migrate"][..], &["status"][..]] {
            let out = run_binary(args, &[("DATABASE_URL", &url)]);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{args:?}: {}",
                output_text(&out)
            );
        }
        let settings = Settings::load_from(None, [("DATABASE_URL".to_owned(), url.clone())])
            .expect("a verify-ca URL is valid configuration");
        let pool = imprint_sync::db::pool(&settings.database).unwrap();
        let ssl: bool =
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(&pool)
                .await
                .expect("querying over verify-ca TLS");
        assert!(ssl, "pg_stat_ssl.ssl must be true under verify-ca");
        pool.close().await;
    }

    /// A server certificate that has expired is a configuration error naming database.url,
    /// at `status` and at `run` (never retried for ever).
    #[tokio::test]
    async fn an_expired_server_certificate_exits_64() {
        let cluster = TlsCluster::start_with(|params| {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        });
        let url = cluster.url("ca.pem");
        let out = run_binary(&["status"], &[("DATABASE_URL", &url)]);
        let text = output_text(&out);
        assert_eq!(out.status.code(), Some(64), "status: {text}");
        assert!(
            text.contains("`database.url`") && text.contains("expired"),
            "the error names the key and the expiry: {text}"
        );
        let env = vec![
            ("DATABASE_URL".to_owned(), url),
            ("IMPRINT_SYNC__API__KEY".to_owned(), API_KEY.to_owned()),
            (
                "IMPRINT_SYNC__API__BASE_URL".to_owned(),
                "http://127.0.0.1:9".to_owned(),
            ),
            (
                "IMPRINT_SYNC__ADMIN__LISTEN".to_owned(),
                "127.0.0.1:0".to_owned(),
            ),
        ];
        let mut daemon = Daemon::start(&["run"], &env);
        assert_eq!(daemon.exit_code(30).await, 64, "run: {}", daemon.stderr());
    }
}
