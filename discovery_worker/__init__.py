"""The discovery worker: claims sessions, discovers assets, trains images, streams progress."""
