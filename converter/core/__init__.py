"""What every part of vidport may import: errors, the manifest, the tensorbin codec. It imports nothing of vidport's own."""
