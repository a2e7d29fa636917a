//! Where a remote disk is: `nbd://HOST:PORT/EXPORT`, or over TLS
//! `nbds://HOST:PORT/EXPORT,ca=FILE[,cert=FILE,key=FILE][,tls-name=NAME]`.
//!
//! `nbds` upgrades the connection with `NBD_OPT_STARTTLS` before anything else
//! and trusts only the CAs in `ca=` for the server's certificate, which must
//! name the host (or `tls-name=`). `cert=` and `key=` are a client certificate
//! and its key, for nodes that require one (`storagenode --tls-ca`). Files only:
//! no key material is ever given on the command line.

use nbd_proto::tls::{ClientTls, TlsError};
use std::path::PathBuf;

/// TLS settings of an `nbds://` disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdTls {
    /// CAs trusted for the server's certificate (PEM).
    pub ca: PathBuf,
    /// A client certificate and its key (PEM files).
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name the server's certificate must carry, if not the host.
    pub server_name: Option<String>,
}

impl NbdTls {
    /// Reads the files into a client configuration.
    pub fn load(&self) -> Result<ClientTls, TlsError> {
        let id = self
            .identity
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()));
        let mut tls = ClientTls::load(&self.ca, id)?;
        tls.server_name = self.server_name.clone();
        Ok(tls)
    }
}

/// `nbd://HOST:PORT/EXPORT` or `nbds://...` parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUrl {
    /// `HOST:PORT`.
    pub addr: String,
    /// The export name (may be empty: the server's default export).
    pub export: String,
    /// TLS (`nbds://`).
    pub tls: Option<NbdTls>,
}

/// Why an `nbd://` or `nbds://` address was refused. Each names the address as
/// given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NbdUrlError {
    /// Not an `nbd://` or `nbds://` address.
    #[error("{0:?} is not an nbd://HOST:PORT/EXPORT or nbds://HOST:PORT/EXPORT,ca=FILE address")]
    NotNbd(String),
    /// The storage node is not `HOST:PORT`.
    #[error("{0:?}: the storage node must be given as HOST:PORT (nbd://HOST:PORT/EXPORT)")]
    NotHostPort(String),
    /// The export name is too long.
    #[error("{0:?}: export name longer than 4096 bytes")]
    ExportTooLong(String),
    /// An `nbds://` option that is not known or has no value.
    #[error(
        "{url:?}: unknown option {option:?} (nbds:// takes ca=FILE, cert=FILE, key=FILE, tls-name=NAME)"
    )]
    UnknownOption {
        /// The address.
        url: String,
        /// The option.
        option: String,
    },
    /// `nbds://` without `ca=`.
    #[error("{0:?}: nbds:// needs ca=FILE, the CA certificates that issued the node's certificate")]
    NoCa(String),
    /// `cert=` without `key=` or the other way round.
    #[error("{0:?}: cert= and key= go together")]
    HalfIdentity(String),
}

impl std::str::FromStr for NbdUrl {
    type Err = NbdUrlError;
    fn from_str(s: &str) -> Result<Self, NbdUrlError> {
        let (rest, tls) = if let Some(r) = s.strip_prefix("nbd://") {
            (r, None)
        } else if let Some(r) = s.strip_prefix("nbds://") {
            let (r, opts) = r.split_once(',').unwrap_or((r, ""));
            (r, Some(parse_tls(s, opts)?))
        } else {
            return Err(NbdUrlError::NotNbd(s.into()));
        };
        let (addr, export) = rest.split_once('/').unwrap_or((rest, ""));
        let port_ok = addr
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
        if !port_ok {
            return Err(NbdUrlError::NotHostPort(s.into()));
        }
        if export.len() > 4096 {
            return Err(NbdUrlError::ExportTooLong(s.into()));
        }
        Ok(NbdUrl {
            addr: addr.into(),
            export: export.into(),
            tls,
        })
    }
}

fn parse_tls(url: &str, opts: &str) -> Result<NbdTls, NbdUrlError> {
    let (mut ca, mut cert, mut key, mut name) = (None, None, None, None);
    for o in opts.split(',').filter(|o| !o.is_empty()) {
        match o.split_once('=') {
            Some(("ca", v)) if !v.is_empty() => ca = Some(PathBuf::from(v)),
            Some(("cert", v)) if !v.is_empty() => cert = Some(PathBuf::from(v)),
            Some(("key", v)) if !v.is_empty() => key = Some(PathBuf::from(v)),
            Some(("tls-name", v)) if !v.is_empty() => name = Some(v.to_string()),
            _ => {
                return Err(NbdUrlError::UnknownOption {
                    url: url.into(),
                    option: o.into(),
                });
            }
        }
    }
    let identity = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => return Err(NbdUrlError::HalfIdentity(url.into())),
    };
    Ok(NbdTls {
        ca: ca.ok_or_else(|| NbdUrlError::NoCa(url.into()))?,
        identity,
        server_name: name,
    })
}

impl std::fmt::Display for NbdUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(t) = &self.tls else {
            return write!(f, "nbd://{}/{}", self.addr, self.export);
        };
        write!(
            f,
            "nbds://{}/{},ca={}",
            self.addr,
            self.export,
            t.ca.display()
        )?;
        if let Some((c, k)) = &t.identity {
            write!(f, ",cert={},key={}", c.display(), k.display())?;
        }
        if let Some(n) = &t.server_name {
            write!(f, ",tls-name={n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbds_options_parse_and_print_back() {
        let u: NbdUrl = "nbds://h:1/x,ca=/c.pem,cert=/a.pem,key=/k.pem,tls-name=node"
            .parse()
            .unwrap();
        let t = u.tls.as_ref().unwrap();
        assert_eq!(t.ca, PathBuf::from("/c.pem"));
        assert_eq!(
            t.identity,
            Some((PathBuf::from("/a.pem"), PathBuf::from("/k.pem")))
        );
        assert_eq!(t.server_name.as_deref(), Some("node"));
        assert_eq!((u.addr.as_str(), u.export.as_str()), ("h:1", "x"));
        assert_eq!(u.to_string().parse::<NbdUrl>().unwrap(), u);
        let plain: NbdUrl = "nbd://h:1/x".parse().unwrap();
        assert_eq!(plain.tls, None);
        assert_eq!(plain.to_string(), "nbd://h:1/x");
    }

    #[test]
    fn bad_nbds_options_are_named() {
        let e = "nbds://h:1/x".parse::<NbdUrl>().unwrap_err();
        assert!(matches!(e, NbdUrlError::NoCa(_)), "{e}");
        let e = "nbds://h:1/x,ca=/c,cert=/a".parse::<NbdUrl>().unwrap_err();
        assert!(matches!(e, NbdUrlError::HalfIdentity(_)), "{e}");
        let e = "nbds://h:1/x,ca=/c,psk=zz".parse::<NbdUrl>().unwrap_err();
        assert!(e.to_string().contains("\"psk=zz\""), "{e}");
        let e = "nbds://h:1/x,ca=".parse::<NbdUrl>().unwrap_err();
        assert!(e.to_string().contains("\"ca=\""), "{e}");
        let e = "https://h:1/x".parse::<NbdUrl>().unwrap_err();
        assert!(matches!(e, NbdUrlError::NotNbd(_)), "{e}");
    }
}
