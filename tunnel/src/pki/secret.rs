//! Cluster mode's CA store: a Kubernetes Secret holding the files of a [`CaDir`] (`ca.crt`,
//! `ca.key`, and during a rotation `ca-previous.crt`, `ca-previous.key`). The first server to
//! start creates it (a replica racing it gets AlreadyExists and uses the winner's); every
//! server mirrors it into a private local directory, which the live TLS reload follows, so a
//! rotation made in the Secret reaches every master without a restart. Rotations change the
//! Secret by compare-and-swap on its resourceVersion.
use std::{collections::BTreeMap, path::Path};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

use crate::{
    error::{Error, Result},
    pki::ca::{CaDir, write_private},
};

/// The Secret's keys, which are also the file names in the mirror directory.
pub const KEYS: [&str; 4] = ["ca.crt", "ca.key", "ca-previous.crt", "ca-previous.key"];

pub struct SecretCa {
    api: Api<Secret>,
    name: String,
}

fn api_err(what: &str, e: kube::Error) -> Error {
    let hint = match &e {
        kube::Error::Api(s) if s.is_forbidden() => {
            " (grant get, create and update on this Secret to the server's service account)"
        }
        _ => "",
    };
    Error::api(format!("{what}{hint}"), e)
}

impl SecretCa {
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
        }
    }

    fn what(&self) -> String {
        format!(
            "Secret {}/{}",
            self.api.namespace().unwrap_or("default"),
            self.name
        )
    }

    /// Creates the Secret with a new CA if absent; returns whether this call created it.
    pub async fn ensure(&self) -> Result<bool> {
        let what = self.what();
        if self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| api_err(&format!("reading {what}"), e))?
            .is_some()
        {
            return Ok(false);
        }
        let tmp = tempdir()?;
        let dir = CaDir::new(tmp.path());
        dir.ensure()?;
        let data = read_dir_data(tmp.path())?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                ..Default::default()
            },
            data: Some(data),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        match self.api.create(&PostParams::default(), &secret).await {
            Ok(_) => Ok(true),
            // Another master created it first: use theirs.
            Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(false),
            Err(e) => Err(api_err(&format!("creating {what}"), e)),
        }
    }

    /// Mirrors the Secret into `dir` (files mode 0600; files whose key is absent are removed).
    /// Returns whether any file changed.
    pub async fn pull(&self, dir: &Path) -> Result<bool> {
        let s = self
            .api
            .get(&self.name)
            .await
            .map_err(|e| api_err(&format!("reading {}", self.what()), e))?;
        let data = s.data.unwrap_or_default();
        if !data.contains_key("ca.crt") || !data.contains_key("ca.key") {
            return Err(Error::TlsConfig(format!(
                "{} lacks ca.crt or ca.key; delete it to have a new CA created",
                self.what()
            )));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let mut changed = false;
        for key in KEYS {
            let path = dir.join(key);
            let old = std::fs::read(&path).ok();
            match data.get(key) {
                Some(v) if old.as_deref() != Some(&v.0[..]) => {
                    write_private(&path, &String::from_utf8_lossy(&v.0))?;
                    changed = true;
                }
                Some(_) => {}
                None if old.is_some() => {
                    std::fs::remove_file(&path)
                        .map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
                    changed = true;
                }
                None => {}
            }
        }
        Ok(changed)
    }

    /// Publishes the trusted CA certificates (no keys) in the ConfigMap `<secret>-bundle`, key
    /// `ca.crt`, which agent pods mount as the bundle that authenticates the servers.
    pub async fn publish_bundle(&self, bundle: &str) -> Result<()> {
        let name = format!("{}-bundle", self.name);
        let api: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(
            self.api.clone().into_client(),
            self.api.namespace().unwrap_or("default"),
        );
        let cm = k8s_openapi::api::core::v1::ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([("ca.crt".to_owned(), bundle.to_owned())])),
            ..Default::default()
        };
        let pp = kube::api::PatchParams::apply("edge-redirector-tunnel").force();
        api.patch(&name, &pp, &kube::api::Patch::Apply(&cm))
            .await
            .map(drop)
            .map_err(|e| api_err(&format!("publishing the CA bundle in ConfigMap {name}"), e))
    }

    /// Applies `change` (e.g. [`CaDir::rotate`]) to the CA in the Secret: read, change a local
    /// copy, write back only if nobody wrote meanwhile (409 Conflict: read again and retry).
    pub async fn update(&self, change: impl Fn(&CaDir) -> Result<()>) -> Result<()> {
        for _ in 0..8 {
            let s = self
                .api
                .get(&self.name)
                .await
                .map_err(|e| api_err(&format!("reading {}", self.what()), e))?;
            let tmp = tempdir()?;
            for (k, v) in s.data.clone().unwrap_or_default() {
                if KEYS.contains(&k.as_str()) {
                    write_private(&tmp.path().join(&k), &String::from_utf8_lossy(&v.0))?;
                }
            }
            change(&CaDir::new(tmp.path()))?;
            let mut next = s.clone();
            next.data = Some(read_dir_data(tmp.path())?);
            match self
                .api
                .replace(&self.name, &PostParams::default(), &next)
                .await
            {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(st)) if st.is_conflict() => continue,
                Err(e) => return Err(api_err(&format!("writing {}", self.what()), e)),
            }
        }
        Err(Error::TlsConfig(format!(
            "{} kept changing under this update; try again",
            self.what()
        )))
    }
}

fn read_dir_data(dir: &Path) -> Result<BTreeMap<String, ByteString>> {
    let mut data = BTreeMap::new();
    for key in KEYS {
        if let Ok(v) = std::fs::read(dir.join(key)) {
            data.insert(key.to_owned(), ByteString(v));
        }
    }
    Ok(data)
}

/// A private temporary directory, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> Result<TempDir> {
    use std::os::unix::fs::DirBuilderExt;
    let p = std::env::temp_dir().join(format!(
        "tunnel-ca-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&p)
        .map_err(|e| Error::io(format!("creating {}", p.display()), e))?;
    Ok(TempDir(p))
}
