#!/usr/bin/env python3
"""Disk taken by the recipe images: all of them together, each layer counted once as Docker
stores it (overlay2 layer folders), against the largest single image. Recipes of one task kind
share their dependency layer, so the total stays a small multiple of one image.

    python benchmarks/image_disk.py            # every image labelled org.selfllm.recipe
    python benchmarks/image_disk.py --top 5    # also the five largest images
"""
from __future__ import annotations

import argparse
import subprocess

import docker

RECIPE_LABEL = "org.selfllm.recipe"
GiB = 1024 ** 3


def layer_dirs(image) -> list[str]:
    """The overlay2 folders of an image's layers (its own and every parent's)."""
    data = image.attrs.get("GraphDriver", {})
    if data.get("Name") != "overlay2":
        raise SystemExit(f"storage driver {data.get('Name')!r}: this script reads overlay2 layer folders only")
    folders = [data["Data"]["UpperDir"]] + [d for d in data["Data"].get("LowerDir", "").split(":") if d]
    return folders


def sizes(folders: set[str]) -> dict[str, int]:
    """Bytes on disk of each folder (du, apparent sizes of files as stored)."""
    out = subprocess.run(["du", "-sb", *sorted(folders)], capture_output=True, text=True, check=True).stdout
    return {path: int(size) for size, path in (line.split("\t", 1) for line in out.splitlines())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=3, help="print this many of the largest images")
    args = parser.parse_args()
    client = docker.from_env()
    images = {}
    for image in client.images.list(filters={"label": RECIPE_LABEL, "dangling": False}):
        images[image.tags[0]] = layer_dirs(image)  # tagged recipe images (left-overs of rebuilds aside)
    if not images:
        raise SystemExit("no recipe images: run `make matrix` first")
    size_of = sizes({d for dirs in images.values() for d in dirs})
    per_image = {tag: sum(size_of[d] for d in dirs) for tag, dirs in images.items()}
    total = sum(size_of.values())
    largest_tag = max(per_image, key=per_image.get)
    largest = per_image[largest_tag]
    print(f"recipe images: {len(images)}")
    print(f"all of them together on disk: {total / GiB:.2f} GiB ({len(size_of)} distinct layers)")
    print(f"largest single image: {largest / GiB:.2f} GiB ({largest_tag})")
    print(f"together / largest: {total / largest:.2f}x")
    print(f"sum of image sizes if nothing were shared: {sum(per_image.values()) / GiB:.2f} GiB")
    for tag in sorted(per_image, key=per_image.get, reverse=True)[: args.top]:
        print(f"  {per_image[tag] / GiB:6.2f} GiB  {tag}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
