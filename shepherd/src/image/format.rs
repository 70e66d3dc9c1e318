//! The on-disk formats of an image's root file system, as `image import --format` names them:
//! the file's name in the image's directory, the type the guest mounts it as, and its maker.

use std::path::Path;

use super::erofs::make_erofs;
use super::ext4::make_ext4;

/// How an imported image's root file system is stored. The default, EROFS, by measurement
/// (benches/REPORT.md section 10, Debian bookworm minbase): its file is 42% smaller than
/// ext4's (116 vs 200 MiB; 12% less disk than ext4's sparse file), it imports as fast, and a job
/// starts and reads its files as fast; lz4hc makes the file 39% smaller again for 20-27% more
/// import time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ImageFormat {
    /// ext4 from `mkfs.ext4 -d`, sized from the tree with room to spare.
    Ext4,
    /// EROFS from `mkfs.erofs`, uncompressed: packed, read-only by design.
    #[default]
    Erofs,
    /// EROFS with lz4hc-compressed data: smaller, decompressed by the guest as it reads.
    ErofsLz4,
}

impl ImageFormat {
    /// The image file's name in its directory.
    pub fn file_name(self) -> &'static str {
        match self {
            ImageFormat::Ext4 => super::IMAGE_FILE,
            ImageFormat::Erofs => "rootfs.erofs",
            ImageFormat::ErofsLz4 => "rootfs-lz4.erofs",
        }
    }

    /// The file system type the guest mounts it as.
    pub fn fstype(self) -> &'static str {
        match self {
            ImageFormat::Ext4 => "ext4",
            ImageFormat::Erofs | ImageFormat::ErofsLz4 => "erofs",
        }
    }

    /// Makes `image` from the tree at `root` (image `name`; the maker's output goes to `log`);
    /// returns the file system's size in bytes.
    pub(super) fn make(
        self,
        name: &str,
        root: &Path,
        image: &Path,
        log: &Path,
    ) -> Result<u64, String> {
        match self {
            ImageFormat::Ext4 => make_ext4(name, root, image, log),
            ImageFormat::Erofs => make_erofs(root, image, log, false),
            ImageFormat::ErofsLz4 => make_erofs(root, image, log, true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_format_has_its_own_file() {
        let files = [ImageFormat::Ext4, ImageFormat::Erofs, ImageFormat::ErofsLz4]
            .map(ImageFormat::file_name);
        assert_ne!(files[0], files[1]);
        assert_ne!(files[1], files[2]);
        assert_ne!(files[0], files[2]);
        assert_eq!(ImageFormat::ErofsLz4.fstype(), "erofs");
    }
}
