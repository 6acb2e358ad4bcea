//! PKCS#12 (RFC 7292) files for Java: a keystore with the SVID's key and chain, and a
//! truststore with the bundle's CAs, both in the form `openssl pkcs12 -export` (OpenSSL 3) and
//! Java 17's keytool write and read:
//!
//! ```text
//! PFX v3
//!   authSafe: data -> AuthenticatedSafe
//!     data -> SafeContents: certBag(leaf, localKeyId, friendlyName), certBag(intermediate)...
//!     data -> SafeContents: pkcs8ShroudedKeyBag(localKeyId, friendlyName)
//!       PBES2: PBKDF2-HMAC-SHA256 (random 16-byte salt, ITERATIONS), AES-256-CBC (random IV)
//!   macData: HMAC-SHA256, key from the RFC 7292 appendix B KDF (ID 3, random salt, ITERATIONS)
//! ```
//!
//! The certificates are not encrypted (`openssl pkcs12 -export -certpbe NONE`): they are public,
//! and the PEM files beside them are 0644. The MAC covers them. In the truststore each CA
//! carries Oracle's trustedKeyUsage attribute (2.16.840.1.113894.746875.1.1), without which
//! Java ignores a certificate that has no key: with it, each is a `trustedCertEntry`.
//!
//! Passwords: PBKDF2 takes the password's UTF-8 bytes and the MAC's KDF its UTF-16 (BMPString)
//! with two zero bytes, as OpenSSL and Java both do. Keys, passwords and derived keys live in
//! `Zeroizing` buffers (ring's digest values on the KDF's path are not zeroized; they are
//! hashes of the password, not the password).

use std::num::NonZeroU32;

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockEncryptMut as _, KeyIvInit as _};
use ring::rand::SecureRandom as _;
use ring::{digest, hmac, pbkdf2};
use yasna::models::ObjectIdentifier;
use yasna::{DERWriter, Tag};
use zeroize::Zeroizing;

/// PBKDF2 and MAC-KDF iterations. OpenSSL 3 writes 2048 and Java 17 10,000. Measured on the
/// 2-core build machine: 100,000 costs the helper about 45 ms of CPU per keystore (PBKDF2 and
/// the MAC's KDF; a debug build) and 15 ms per truststore, once per rotation; `openssl pkcs12`
/// opens the keystore in 0.07 s (0.02 s at 2048) and keytool in 0.06 s more than at 2048,
/// once per start or reload. Ten times the work for a guesser costs that little here.
pub(crate) const ITERATIONS: u32 = 100_000;

/// Bytes of salt for PBKDF2 and the MAC.
const SALT_LEN: usize = 16;

/// RFC 7292 appendix B: SHA-256's output (u) and block (v) sizes in bytes.
const KDF_U: usize = 32;
const KDF_V: usize = 64;
/// The KDF's purpose byte for a MAC key.
const KDF_ID_MAC: u8 = 3;

// OIDs (RFC 7292, RFC 8018, RFC 2985, NIST, and Oracle's for Java trust).
const OID_DATA: &[u64] = &[1, 2, 840, 113549, 1, 7, 1];
const OID_SHROUDED_KEY_BAG: &[u64] = &[1, 2, 840, 113549, 1, 12, 10, 1, 2];
const OID_CERT_BAG: &[u64] = &[1, 2, 840, 113549, 1, 12, 10, 1, 3];
const OID_X509_CERTIFICATE: &[u64] = &[1, 2, 840, 113549, 1, 9, 22, 1];
const OID_FRIENDLY_NAME: &[u64] = &[1, 2, 840, 113549, 1, 9, 20];
const OID_LOCAL_KEY_ID: &[u64] = &[1, 2, 840, 113549, 1, 9, 21];
const OID_PBES2: &[u64] = &[1, 2, 840, 113549, 1, 5, 13];
const OID_PBKDF2: &[u64] = &[1, 2, 840, 113549, 1, 5, 12];
const OID_HMAC_SHA256: &[u64] = &[1, 2, 840, 113549, 2, 9];
const OID_AES256_CBC: &[u64] = &[2, 16, 840, 1, 101, 3, 4, 1, 42];
const OID_SHA256: &[u64] = &[2, 16, 840, 1, 101, 3, 4, 2, 1];
const OID_ORACLE_TRUSTED_KEY_USAGE: &[u64] = &[2, 16, 840, 1, 113894, 746875, 1, 1];
const OID_ANY_EXTENDED_KEY_USAGE: &[u64] = &[2, 5, 29, 37, 0];

/// A keystore password: the first line of `pkcs12_password_file`. Zeroized on drop; its
/// `Debug` shows only its length.
#[derive(Clone)]
pub(crate) struct Password(Zeroizing<String>);

impl Password {
    /// A password; `None` when it is empty (OpenSSL and Java treat an empty PKCS#12
    /// password differently, and it protects nothing).
    pub(crate) fn new(password: Zeroizing<String>) -> Option<Self> {
        (!password.is_empty()).then_some(Self(password))
    }

    /// UTF-16 big-endian with two zero bytes: the MAC KDF's password (RFC 7292 B.1).
    fn bmp(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(self.0.len() * 2 + 2));
        for unit in self.0.encode_utf16() {
            out.extend_from_slice(&unit.to_be_bytes());
        }
        out.extend_from_slice(&[0, 0]);
        out
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Password({} bytes)", self.0.len())
    }
}

/// Building a PKCS#12 file failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum Pkcs12Error {
    /// The system's random number generator failed.
    #[error("the system's random number generator failed")]
    Random,
    /// AES-256-CBC refused its key or IV (a bug: both have fixed sizes).
    #[error("AES-256-CBC refused its key or IV")]
    BugCipherInit,
}

/// Where salts and IVs come from: the system in production, fixed bytes in tests.
type Fill<'a> = &'a mut dyn FnMut(&mut [u8]) -> Result<(), Pkcs12Error>;

fn system_random(out: &mut [u8]) -> Result<(), Pkcs12Error> {
    ring::rand::SystemRandom::new()
        .fill(out)
        .map_err(|_| Pkcs12Error::Random)
}

/// A keystore: the PKCS#8 `key` encrypted, the `chain` (leaf first) as certificates; the
/// leaf and key share a localKeyId and carry `alias` as friendlyName (keytool's alias).
pub(crate) fn keystore(
    password: &Password,
    alias: &str,
    key_pkcs8: &[u8],
    chain: &[&[u8]],
) -> Result<Zeroizing<Vec<u8>>, Pkcs12Error> {
    keystore_with(
        password,
        alias,
        key_pkcs8,
        chain,
        ITERATIONS,
        &mut system_random,
    )
}

/// A truststore: each `(alias, certificate)` a trusted certificate for Java.
pub(crate) fn truststore(
    password: &Password,
    cas: &[(String, &[u8])],
) -> Result<Vec<u8>, Pkcs12Error> {
    truststore_with(password, cas, ITERATIONS, &mut system_random)
}

fn keystore_with(
    password: &Password,
    alias: &str,
    key_pkcs8: &[u8],
    chain: &[&[u8]],
    iterations: u32,
    fill: Fill<'_>,
) -> Result<Zeroizing<Vec<u8>>, Pkcs12Error> {
    // The localKeyId pairs the key with its certificate; like OpenSSL, a hash of the
    // certificate (SHA-256 here, OpenSSL's is SHA-1).
    let key_id = chain
        .first()
        .map(|leaf| digest::digest(&digest::SHA256, leaf).as_ref().to_vec())
        .unwrap_or_default();
    let certs = yasna::construct_der(|w| {
        w.write_sequence_of(|w| {
            for (i, cert) in chain.iter().enumerate() {
                let attrs = (i == 0).then_some(Attrs::Key {
                    alias,
                    key_id: &key_id,
                });
                write_cert_bag(w.next(), cert, attrs);
            }
        });
    });
    let shrouded = encrypt_key(password, key_pkcs8, iterations, fill)?;
    let keys = yasna::construct_der(|w| {
        w.write_sequence_of(|w| {
            w.next().write_sequence(|w| {
                w.next().write_oid(&oid(OID_SHROUDED_KEY_BAG));
                w.next()
                    .write_tagged(Tag::context(0), |w| w.write_der(&shrouded));
                write_attrs(
                    w.next(),
                    &Attrs::Key {
                        alias,
                        key_id: &key_id,
                    },
                );
            });
        });
    });
    pfx(password, &[&certs, &keys], iterations, fill).map(Zeroizing::new)
}

fn truststore_with(
    password: &Password,
    cas: &[(String, &[u8])],
    iterations: u32,
    fill: Fill<'_>,
) -> Result<Vec<u8>, Pkcs12Error> {
    let certs = yasna::construct_der(|w| {
        w.write_sequence_of(|w| {
            for (alias, cert) in cas {
                write_cert_bag(w.next(), cert, Some(Attrs::Trusted { alias }));
            }
        });
    });
    pfx(password, &[&certs], iterations, fill)
}

/// A bag's attributes.
enum Attrs<'a> {
    /// The key and its certificate: friendlyName and localKeyId.
    Key { alias: &'a str, key_id: &'a [u8] },
    /// A CA for Java's trust: friendlyName and Oracle's trustedKeyUsage (any usage).
    Trusted { alias: &'a str },
}

fn oid(arcs: &[u64]) -> ObjectIdentifier {
    ObjectIdentifier::from_slice(arcs)
}

/// `SET OF PKCS12Attribute`, each `SEQUENCE { OID, SET OF value }`.
fn write_attrs(w: DERWriter<'_>, attrs: &Attrs<'_>) {
    let attribute = |w: DERWriter<'_>, id: &[u64], value: &dyn Fn(DERWriter<'_>)| {
        w.write_sequence(|w| {
            w.next().write_oid(&oid(id));
            w.next().write_set_of(|w| value(w.next()));
        });
    };
    w.write_set_of(|w| match attrs {
        Attrs::Key { alias, key_id } => {
            attribute(w.next(), OID_FRIENDLY_NAME, &|w| w.write_bmp_string(alias));
            attribute(w.next(), OID_LOCAL_KEY_ID, &|w| w.write_bytes(key_id));
        }
        Attrs::Trusted { alias } => {
            attribute(w.next(), OID_FRIENDLY_NAME, &|w| w.write_bmp_string(alias));
            attribute(w.next(), OID_ORACLE_TRUSTED_KEY_USAGE, &|w| {
                w.write_oid(&oid(OID_ANY_EXTENDED_KEY_USAGE));
            });
        }
    });
}

/// `SafeBag { certBag, [0] CertBag { x509Certificate, [0] OCTET STRING }, attrs }`.
fn write_cert_bag(w: DERWriter<'_>, cert: &[u8], attrs: Option<Attrs<'_>>) {
    w.write_sequence(|w| {
        w.next().write_oid(&oid(OID_CERT_BAG));
        w.next().write_tagged(Tag::context(0), |w| {
            w.write_sequence(|w| {
                w.next().write_oid(&oid(OID_X509_CERTIFICATE));
                w.next()
                    .write_tagged(Tag::context(0), |w| w.write_bytes(cert));
            });
        });
        if let Some(attrs) = &attrs {
            write_attrs(w.next(), attrs);
        }
    });
}

/// `AlgorithmIdentifier { oid, NULL }`.
fn write_alg_null(w: DERWriter<'_>, id: &[u64]) {
    w.write_sequence(|w| {
        w.next().write_oid(&oid(id));
        w.next().write_null();
    });
}

/// `EncryptedPrivateKeyInfo` with PBES2 (PBKDF2-HMAC-SHA256, AES-256-CBC).
fn encrypt_key(
    password: &Password,
    key_pkcs8: &[u8],
    iterations: u32,
    fill: Fill<'_>,
) -> Result<Vec<u8>, Pkcs12Error> {
    let mut salt = [0u8; SALT_LEN];
    fill(&mut salt)?;
    let mut iv = [0u8; 16];
    fill(&mut iv)?;
    let mut aes_key = Zeroizing::new([0u8; 32]);
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        NonZeroU32::new(iterations).unwrap_or(NonZeroU32::MIN),
        &salt,
        password.0.as_bytes(),
        aes_key.as_mut_slice(),
    );
    let encrypted = cbc::Encryptor::<aes::Aes256>::new_from_slices(aes_key.as_slice(), &iv)
        .map_err(|_| Pkcs12Error::BugCipherInit)?
        .encrypt_padded_vec_mut::<Pkcs7>(key_pkcs8);
    Ok(yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_sequence(|w| {
                w.next().write_oid(&oid(OID_PBES2));
                w.next().write_sequence(|w| {
                    w.next().write_sequence(|w| {
                        w.next().write_oid(&oid(OID_PBKDF2));
                        w.next().write_sequence(|w| {
                            w.next().write_bytes(&salt);
                            w.next().write_u32(iterations);
                            write_alg_null(w.next(), OID_HMAC_SHA256);
                        });
                    });
                    w.next().write_sequence(|w| {
                        w.next().write_oid(&oid(OID_AES256_CBC));
                        w.next().write_bytes(&iv);
                    });
                });
            });
            w.next().write_bytes(&encrypted);
        });
    }))
}

/// `ContentInfo { data, [0] OCTET STRING }`.
fn write_data(w: DERWriter<'_>, content: &[u8]) {
    w.write_sequence(|w| {
        w.next().write_oid(&oid(OID_DATA));
        w.next()
            .write_tagged(Tag::context(0), |w| w.write_bytes(content));
    });
}

/// The PFX around `safe_contents` (each a DER `SafeContents`), with its MAC.
fn pfx(
    password: &Password,
    safe_contents: &[&[u8]],
    iterations: u32,
    fill: Fill<'_>,
) -> Result<Vec<u8>, Pkcs12Error> {
    let auth_safe = yasna::construct_der(|w| {
        w.write_sequence_of(|w| {
            for contents in safe_contents {
                write_data(w.next(), contents);
            }
        });
    });
    let mut mac_salt = [0u8; SALT_LEN];
    fill(&mut mac_salt)?;
    let mac_key = kdf(password, &mac_salt, KDF_ID_MAC, iterations, KDF_U);
    let mac = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &mac_key), &auth_safe);
    Ok(yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_u32(3);
            write_data(w.next(), &auth_safe);
            w.next().write_sequence(|w| {
                w.next().write_sequence(|w| {
                    write_alg_null(w.next(), OID_SHA256);
                    w.next().write_bytes(mac.as_ref());
                });
                w.next().write_bytes(&mac_salt);
                w.next().write_u32(iterations);
            });
        });
    }))
}

/// RFC 7292 appendix B.2 with SHA-256: `len` bytes of key for purpose `id`.
fn kdf(
    password: &Password,
    salt: &[u8],
    id: u8,
    iterations: u32,
    len: usize,
) -> Zeroizing<Vec<u8>> {
    // S and P: salt and password repeated to a whole number of v-byte blocks; I = S || P.
    let stretch = |src: &[u8], out: &mut Vec<u8>| {
        let n = KDF_V * src.len().div_ceil(KDF_V);
        out.extend(src.iter().cycle().take(n));
    };
    let mut i = Zeroizing::new(Vec::new());
    stretch(salt, &mut i);
    stretch(&password.bmp(), &mut i);
    let d = [id; KDF_V];
    let mut out = Zeroizing::new(Vec::with_capacity(len));
    loop {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(&d);
        ctx.update(&i);
        let mut a = ctx.finish();
        for _ in 1..iterations {
            a = digest::digest(&digest::SHA256, a.as_ref());
        }
        let a = a.as_ref();
        let take = KDF_U.min(len - out.len());
        out.extend_from_slice(&a[..take]);
        if out.len() >= len {
            return out;
        }
        // I_j = (I_j + B + 1) mod 2^(8v), B being A repeated to v bytes.
        let b: Vec<u8> = a.iter().cycle().take(KDF_V).copied().collect();
        for block in i.chunks_mut(KDF_V) {
            let mut carry = 1u16;
            for (x, y) in block.iter_mut().zip(&b).rev() {
                let sum = u16::from(*x) + u16::from(*y) + carry;
                *x = sum.to_le_bytes()[0];
                carry = sum >> 8;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use aes::cipher::BlockDecryptMut as _;
    use yasna::BERReader;

    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(char::is_ascii_hexdigit).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn password(s: &str) -> Password {
        Password::new(Zeroizing::new(s.to_owned())).unwrap()
    }

    /// A known answer computed by OpenSSL's PKCS12_key_gen (through the Perl module
    /// Crypt::OpenSSL::PKCS::Func, whose test t/base.t holds it): password "123456", salt
    /// e241f01650dbeae4, ID 3 (MAC), 2048 iterations, SHA-256, 32 bytes.
    #[test]
    fn the_kdf_matches_openssls_known_answer() {
        let key = kdf(
            &password("123456"),
            &hex("e241f01650dbeae4"),
            KDF_ID_MAC,
            2048,
            32,
        );
        assert_eq!(
            key.as_slice(),
            hex(
                "72:12:59:F1:4A:AD:70:B5:88:39:F7:15:66:B4:33:DA:1B:8A:D0:8F:65:0F:4D:02:FA:AA:0B:9B:09:5B:B5:1D"
            )
        );
    }

    /// The same vector's PBKDF2 half checks we hand ring the password as OpenSSL does.
    #[test]
    fn pbkdf2_takes_the_password_as_openssl_does() {
        let mut out = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            NonZeroU32::new(2048).unwrap(),
            &hex("b698314b0d68bcbd"),
            b"123456",
            &mut out,
        );
        assert_eq!(
            out.to_vec(),
            hex(
                "F6:8B:53:86:DE:3A:8D:63:35:84:69:50:54:4D:29:A5:5A:D3:32:8D:EA:17:68:53:04:D7:82:28:48:AE:C5:34"
            )
        );
    }

    /// More than one output block, and a salt and password longer than a block, exercise
    /// the I_j update (with carries) that one block never reaches.
    #[test]
    fn the_kdf_output_is_a_prefix_of_a_longer_output() {
        let p = password(&"long password ".repeat(6));
        let salt = [0xffu8; 70];
        let long = kdf(&p, &salt, 1, 3, 100);
        let short = kdf(&p, &salt, 1, 3, 40);
        assert_eq!(long.len(), 100);
        assert_eq!(&long[..40], short.as_slice());
        assert_ne!(&long[..32], &long[32..64]);
    }

    /// A certificate bag: (certificate, friendlyName, localKeyId, trusted).
    type CertBag = (Vec<u8>, Option<String>, Option<Vec<u8>>, bool);
    /// A key bag: (PKCS#8, friendlyName, localKeyId).
    type KeyBag = (Vec<u8>, Option<String>, Option<Vec<u8>>);

    /// What a reader (written here only for the test) finds in a file.
    #[derive(Debug, Default)]
    struct Parsed {
        certs: Vec<CertBag>,
        keys: Vec<KeyBag>,
    }

    fn read_alg<'a>(r: BERReader<'a, '_>) -> yasna::ASN1Result<(ObjectIdentifier, Vec<u8>)> {
        r.read_sequence(|r| {
            let id = r.next().read_oid()?;
            let params = r.read_optional(|r| r.read_der())?.unwrap_or_default();
            Ok((id, params))
        })
    }

    /// Checks the MAC with `pw` and decodes every bag; `Err` on a wrong password.
    fn parse(der: &[u8], pw: &Password) -> Result<Parsed, String> {
        let (auth_safe, mac, salt, iterations) = yasna::parse_der(der, |r| {
            r.read_sequence(|r| {
                assert_eq!(r.next().read_u32()?, 3);
                let auth_safe = r.next().read_sequence(|r| {
                    assert_eq!(r.next().read_oid()?, oid(OID_DATA));
                    r.next().read_tagged(Tag::context(0), |r| r.read_bytes())
                })?;
                let (mac, salt, iterations) = r.next().read_sequence(|r| {
                    let mac = r.next().read_sequence(|r| {
                        let (alg, _) = read_alg(r.next())?;
                        assert_eq!(alg, oid(OID_SHA256));
                        r.next().read_bytes()
                    })?;
                    Ok((mac, r.next().read_bytes()?, r.next().read_u32()?))
                })?;
                Ok((auth_safe, mac, salt, iterations))
            })
        })
        .map_err(|e| e.to_string())?;
        let key = kdf(pw, &salt, KDF_ID_MAC, iterations, 32);
        hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, &key), &auth_safe, &mac)
            .map_err(|_| "MAC verification failed".to_owned())?;
        let mut parsed = Parsed::default();
        let contents: Vec<Vec<u8>> = yasna::parse_der(&auth_safe, |r| {
            r.collect_sequence_of(|r| {
                r.read_sequence(|r| {
                    assert_eq!(r.next().read_oid()?, oid(OID_DATA));
                    r.next().read_tagged(Tag::context(0), |r| r.read_bytes())
                })
            })
        })
        .map_err(|e| e.to_string())?;
        for safe in contents {
            let bags = yasna::parse_der(&safe, |r| {
                r.collect_sequence_of(|r| {
                    r.read_sequence(|r| {
                        let id = r.next().read_oid()?;
                        let value = r.next().read_tagged(Tag::context(0), |r| r.read_der())?;
                        let attrs = r.read_optional(|r| {
                            r.collect_set_of(|r| {
                                r.read_sequence(|r| {
                                    let id = r.next().read_oid()?;
                                    let v = r.next().collect_set_of(|r| r.read_der())?;
                                    Ok((id, v))
                                })
                            })
                        })?;
                        Ok((id, value, attrs.unwrap_or_default()))
                    })
                })
            })
            .map_err(|e| e.to_string())?;
            for (id, value, attrs) in bags {
                let mut name = None;
                let mut key_id = None;
                let mut trusted = false;
                for (attr, values) in attrs {
                    assert_eq!(values.len(), 1);
                    if attr == oid(OID_FRIENDLY_NAME) {
                        name = Some(yasna::parse_der(&values[0], |r| r.read_bmp_string()).unwrap());
                    } else if attr == oid(OID_LOCAL_KEY_ID) {
                        key_id = Some(yasna::parse_der(&values[0], |r| r.read_bytes()).unwrap());
                    } else if attr == oid(OID_ORACLE_TRUSTED_KEY_USAGE) {
                        let usage = yasna::parse_der(&values[0], |r| r.read_oid()).unwrap();
                        assert_eq!(usage, oid(OID_ANY_EXTENDED_KEY_USAGE));
                        trusted = true;
                    }
                }
                if id == oid(OID_CERT_BAG) {
                    let cert = yasna::parse_der(&value, |r| {
                        r.read_sequence(|r| {
                            assert_eq!(r.next().read_oid()?, oid(OID_X509_CERTIFICATE));
                            r.next().read_tagged(Tag::context(0), |r| r.read_bytes())
                        })
                    })
                    .unwrap();
                    parsed.certs.push((cert, name, key_id, trusted));
                } else {
                    assert_eq!(id, oid(OID_SHROUDED_KEY_BAG));
                    parsed.keys.push((decrypt_key(&value, pw), name, key_id));
                }
            }
        }
        Ok(parsed)
    }

    fn decrypt_key(der: &[u8], pw: &Password) -> Vec<u8> {
        let (salt, iterations, iv, encrypted) = yasna::parse_der(der, |r| {
            r.read_sequence(|r| {
                let params = r.next().read_sequence(|r| {
                    assert_eq!(r.next().read_oid()?, oid(OID_PBES2));
                    r.next().read_sequence(|r| {
                        let (salt, iterations) = r.next().read_sequence(|r| {
                            assert_eq!(r.next().read_oid()?, oid(OID_PBKDF2));
                            r.next().read_sequence(|r| {
                                let salt = r.next().read_bytes()?;
                                let iterations = r.next().read_u32()?;
                                let (prf, _) = read_alg(r.next())?;
                                assert_eq!(prf, oid(OID_HMAC_SHA256));
                                Ok((salt, iterations))
                            })
                        })?;
                        let iv = r.next().read_sequence(|r| {
                            assert_eq!(r.next().read_oid()?, oid(OID_AES256_CBC));
                            r.next().read_bytes()
                        })?;
                        Ok((salt, iterations, iv))
                    })
                })?;
                Ok((params.0, params.1, params.2, r.next().read_bytes()?))
            })
        })
        .unwrap();
        let mut key = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            NonZeroU32::new(iterations).unwrap(),
            &salt,
            pw.0.as_bytes(),
            &mut key,
        );
        cbc::Decryptor::<aes::Aes256>::new_from_slices(&key, &iv)
            .unwrap()
            .decrypt_padded_vec_mut::<Pkcs7>(&encrypted)
            .unwrap()
    }

    #[test]
    fn a_keystore_round_trips_with_its_password_only() {
        let pw = password("s3cret é");
        let key = b"not really PKCS#8, but any bytes round-trip".to_vec();
        let (leaf, inter) = (b"leaf".to_vec(), b"intermediate".to_vec());
        let der = keystore(&pw, "spiffe://example.org/web", &key, &[&leaf, &inter]).unwrap();
        let p = parse(&der, &pw).unwrap();
        assert_eq!(p.keys.len(), 1);
        let (k, name, key_id) = &p.keys[0];
        assert_eq!(k, &key);
        assert_eq!(name.as_deref(), Some("spiffe://example.org/web"));
        assert_eq!(p.certs.len(), 2);
        assert_eq!(p.certs[0].0, leaf);
        assert_eq!(p.certs[0].1, *name);
        assert_eq!(&p.certs[0].2, key_id);
        assert!(key_id.as_ref().is_some_and(|id| id.len() == 32));
        assert_eq!(p.certs[1], (inter, None, None, false));
        assert!(parse(&der, &password("s3cret e")).is_err());
    }

    #[test]
    fn salts_and_ivs_are_fresh_each_time_and_iterations_as_asked() {
        let pw = password("pw");
        let a = keystore(&pw, "a", b"key", &[b"leaf"]).unwrap();
        let b = keystore(&pw, "a", b"key", &[b"leaf"]).unwrap();
        assert_ne!(a, b);
        // Fixed randomness gives the same bytes: nothing else varies.
        let mut counter = 0u8;
        let mut fixed = |out: &mut [u8]| {
            counter = 0;
            for x in out.iter_mut() {
                counter = counter.wrapping_add(1);
                *x = counter;
            }
            Ok(())
        };
        let c = keystore_with(&pw, "a", b"key", &[b"leaf"], 7, &mut fixed).unwrap();
        let d = keystore_with(&pw, "a", b"key", &[b"leaf"], 7, &mut fixed).unwrap();
        assert_eq!(c, d);
        assert_eq!(parse(&c, &pw).unwrap().keys[0].0, b"key");
        // The iteration count is written where readers look (MAC and PBKDF2).
        let needle = yasna::construct_der(|w| w.write_u32(ITERATIONS));
        assert_eq!(a.windows(needle.len()).filter(|w| *w == needle).count(), 2);
    }

    #[test]
    fn a_truststore_marks_every_ca_trusted_with_its_alias() {
        let pw = password("pw");
        let der = truststore(
            &pw,
            &[
                ("example.org".to_owned(), b"ca one".as_slice()),
                ("other.org".to_owned(), b"ca two".as_slice()),
            ],
        )
        .unwrap();
        let p = parse(&der, &pw).unwrap();
        assert!(p.keys.is_empty());
        assert_eq!(
            p.certs,
            [
                (b"ca one".to_vec(), Some("example.org".into()), None, true),
                (b"ca two".to_vec(), Some("other.org".into()), None, true),
            ]
        );
    }

    #[test]
    fn the_password_never_shows_in_debug() {
        let pw = password("hunter2");
        assert_eq!(format!("{pw:?}"), "Password(7 bytes)");
        assert!(Password::new(Zeroizing::new(String::new())).is_none());
    }
}
