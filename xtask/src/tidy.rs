//! Tidy checks over the source tree, run as tests (`cargo xtask test`): every module
//! says what it is for, and the architecture invariants of `docs/ARCHITECTURE.md` that can be
//! checked by reading the source hold.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use crate::harness::root;

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    fn sources() -> Vec<(PathBuf, String)> {
        let mut files = Vec::new();
        rust_files(&root().join("crates"), &mut files);
        rust_files(&root().join("xtask/src"), &mut files);
        files.sort();
        files
            .into_iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p).unwrap();
                (p, text)
            })
            .collect()
    }

    fn rel(p: &Path) -> String {
        p.strip_prefix(root()).unwrap().display().to_string()
    }

    #[test]
    fn every_module_starts_with_a_doc_comment() {
        let missing: Vec<String> = sources()
            .into_iter()
            .filter(|(_, text)| !text.trim_start().starts_with("//!"))
            .map(|(p, _)| rel(&p))
            .collect();
        assert!(missing.is_empty(), "modules without a //! doc: {missing:?}");
    }

    #[test]
    fn only_patina_store_names_sqlite() {
        let offenders: Vec<String> = sources()
            .into_iter()
            .filter(|(p, text)| {
                let r = rel(p);
                !r.starts_with("crates/patina-store/")
                    && !r.starts_with("xtask/src/tidy.rs")
                    && text.contains("rusqlite")
            })
            .map(|(p, _)| rel(&p))
            .collect();
        assert!(
            offenders.is_empty(),
            "SQLite outside patina-store: {offenders:?}"
        );
    }

    #[test]
    fn the_store_knows_nothing_of_machines_protobuf_or_grpc() {
        for (p, text) in sources() {
            let r = rel(&p);
            if !r.starts_with("crates/patina-store/src") {
                continue;
            }
            for banned in ["patina_proto", "prost", "tonic", "Machine"] {
                assert!(!text.contains(banned), "{r} names {banned}");
            }
        }
    }

    #[test]
    fn the_gossip_core_knows_no_runtime_sqlite_grpc_or_wall_clock() {
        // The tokio shell (`src/shell/`) is the one exception.
        for (p, text) in sources() {
            let r = rel(&p);
            if !r.starts_with("crates/patina-gossip/src") || r.contains("/shell/") {
                continue;
            }
            let code: String = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            for banned in [
                "tokio::",
                "rusqlite",
                "tonic",
                "Instant::now",
                "SystemTime::now",
            ] {
                assert!(!code.contains(banned), "{r} names {banned}");
            }
        }
    }

    #[test]
    fn no_grab_bag_modules() {
        for (p, _) in sources() {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            assert!(
                ![
                    "util.rs",
                    "utils.rs",
                    "helpers.rs",
                    "handlers.rs",
                    "types.rs"
                ]
                .contains(&name.as_str()),
                "{} is a grab-bag name: name a module for its one job",
                rel(&p)
            );
        }
    }
}
