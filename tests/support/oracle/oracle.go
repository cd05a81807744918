// The loaders' reading of tars and JSON, as an oracle for the differential tests.
//
// Docker, containerd, podman, skopeo and umoci read archives with Go's
// archive/tar and their JSON with encoding/json. This program reads with
// the same code and prints, for each input file, one JSON line.
//
//	oracle tar FILE...      {"entries": [{"name", "type", "linkname", "size", "sha256"}]} or {"error"}
//	                        (name, type and linkname in hex: bytes, maybe not UTF-8)
//	oracle json FILE...     {"value": <what docker's structs hold>} or {"error"}
//
// Standard library only: it builds offline.
package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
)

type entry struct {
	Name     string `json:"name"`
	Type     string `json:"type"`
	Linkname string `json:"linkname"`
	Size     int64  `json:"size"`
	Sha256   string `json:"sha256"`
}

func readTar(data []byte) map[string]interface{} {
	reader := tar.NewReader(bytes.NewReader(data))
	entries := []entry{}
	for {
		header, err := reader.Next()
		if err == io.EOF {
			return map[string]interface{}{"entries": entries}
		}
		if err != nil {
			return map[string]interface{}{"error": err.Error()}
		}
		digest := sha256.New()
		size, err := io.Copy(digest, reader)
		if err != nil {
			return map[string]interface{}{"error": err.Error()}
		}
		entries = append(entries, entry{
			Name:     hex.EncodeToString([]byte(header.Name)),
			Type:     hex.EncodeToString([]byte{header.Typeflag}),
			Linkname: hex.EncodeToString([]byte(header.Linkname)),
			Size:     size,
			Sha256:   hex.EncodeToString(digest.Sum(nil)),
		})
	}
}

// What docker keeps of an image config and a manifest (the fields that
// decide what runs), matched as encoding/json matches them.
type containerConfig struct {
	Cmd        []string
	Entrypoint []string
	Env        []string
	User       string
	WorkingDir string
}

type document struct {
	Architecture string
	OS           string
	Config       *containerConfig
	Rootfs       *struct {
		Type    string
		DiffIDs []string `json:"diff_ids"`
	}
	Manifests []struct {
		Digest string
	}
	Layers []json.RawMessage
}

func readJSON(data []byte) map[string]interface{} {
	var value document
	if err := json.Unmarshal(data, &value); err != nil {
		var list []struct {
			Config   string
			RepoTags []string
			Layers   []string
		}
		if listErr := json.Unmarshal(data, &list); listErr != nil {
			return map[string]interface{}{"error": err.Error()}
		}
		return map[string]interface{}{"value": list}
	}
	return map[string]interface{}{"value": value}
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: oracle tar|json FILE...")
		os.Exit(2)
	}
	out := json.NewEncoder(os.Stdout)
	for _, path := range os.Args[2:] {
		data, err := os.ReadFile(path)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		var result map[string]interface{}
		if os.Args[1] == "tar" {
			result = readTar(data)
		} else {
			result = readJSON(data)
		}
		if err := out.Encode(result); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
}
