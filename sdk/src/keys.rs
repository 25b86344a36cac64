//! Keys: generate, save and load ed25519 keypairs (a file holding the 32-byte seed as 64 hex
//! characters), and issue player session tokens offline with the studio key.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hoard_types::wire::{SessionToken, SESSION_TOKEN_TTL_MS_MAX};
use hoard_types::{Keypair, PublicKey, TenantId};

use crate::error::{Error, Result};

/// A fresh random keypair (from the operating system's randomness).
pub fn generate() -> Keypair {
    Keypair::generate()
}

/// Writes `key`'s seed as hex (one line) to `path`, readable only by its owner on Unix.
/// Refuses to overwrite an existing file.
pub fn save(path: impl AsRef<Path>, key: &Keypair) -> Result<()> {
    use std::io::Write;
    let path = path.as_ref();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|error| Error::Io(format!("{}: {error}", path.display())))?;
    writeln!(file, "{}", key.seed_hex()).map_err(|error| Error::Io(format!("{}: {error}", path.display())))
}

/// Reads a keypair written by [`save`] (64 hex characters, surrounding whitespace ignored).
pub fn load(path: impl AsRef<Path>) -> Result<Keypair> {
    let path = path.as_ref();
    let text =
        std::fs::read_to_string(path).map_err(|error| Error::Io(format!("{}: {error}", path.display())))?;
    Keypair::from_seed_hex(text.trim()).map_err(|error| Error::Io(format!("{}: {error}", path.display())))
}

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

/// Issues a session token for `player`, valid for `ttl` from now (at most 7 days), signed with the
/// studio key. Offline: no connection needed. Hand it to the player's game client, which connects
/// with [`crate::Credentials::player`].
///
/// ```
/// use std::time::Duration;
/// use hoard_sdk::{keys, TenantId};
/// let studio = keys::generate();
/// let player = keys::generate();
/// let token = keys::issue_session_token(&studio, TenantId(1), player.public(), Duration::from_secs(3600)).unwrap();
/// assert!(token.verify(&studio.public(), keys::now_unix_ms()).is_ok());
/// ```
pub fn issue_session_token(
    studio: &Keypair,
    tenant: TenantId,
    player: PublicKey,
    ttl: Duration,
) -> Result<SessionToken> {
    let ttl_ms = ttl.as_millis() as u64;
    if ttl_ms == 0 || ttl_ms > SESSION_TOKEN_TTL_MS_MAX {
        return Err(Error::InvalidArgument("a session token lives 1 ms to 7 days"));
    }
    Ok(SessionToken::issue(
        studio,
        tenant,
        player,
        now_unix_ms() + ttl_ms,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_a_file_and_are_not_overwritten() {
        let directory = std::env::temp_dir().join(format!("hoard-sdk-keys-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join("studio.key");
        let _ = std::fs::remove_file(&path);
        let key = generate();
        save(&path, &key).unwrap();
        assert_eq!(load(&path).unwrap().public(), key.public());
        assert_eq!(save(&path, &generate()).unwrap_err().kind(), crate::ErrorKind::Io);
        std::fs::write(&path, "not hex").unwrap();
        assert!(load(&path).is_err());
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn session_tokens_have_bounded_lifetimes() {
        let studio = generate();
        let player = generate().public();
        assert!(issue_session_token(&studio, TenantId(1), player, Duration::ZERO).is_err());
        assert!(
            issue_session_token(&studio, TenantId(1), player, Duration::from_secs(8 * 24 * 3600)).is_err()
        );
        let token = issue_session_token(&studio, TenantId(1), player, Duration::from_secs(60)).unwrap();
        token.verify(&studio.public(), now_unix_ms()).unwrap();
    }
}
