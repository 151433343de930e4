package docker

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"strings"
)

// Docker fixes a container's labels at its creation. The labels Update
// adds live in one JSON file per container under Config.StateDir, written
// whole by rename, and are merged over the container's own.

// validFileName reports whether id can name a file in the state directory.
func validFileName(id string) bool {
	return id != "" && id != "." && id != ".." && !strings.ContainsAny(id, "/\x00")
}

// labels returns a container's labels: created merged with the added ones.
func (r *Runtime) labels(id string, created map[string]string) (map[string]string, error) {
	out := maps.Clone(created)
	if out == nil {
		out = map[string]string{}
	}
	added, err := r.readLabels(id)
	if err != nil {
		return nil, err
	}
	maps.Copy(out, added)
	return out, nil
}

func (r *Runtime) readLabels(id string) (map[string]string, error) {
	if !validFileName(id) {
		return nil, nil
	}
	b, err := os.ReadFile(r.labelsPath(id))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("labels of container %s: %w", id, err)
	}
	var m map[string]string
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("labels of container %s: %s: %w", id, r.labelsPath(id), err)
	}
	return m, nil
}

// addLabels adds labels to the container's file, replacing equal keys.
func (r *Runtime) addLabels(id string, labels map[string]string) error {
	if !validFileName(id) {
		return fmt.Errorf("update labels of container %s: not a valid container name", id)
	}
	r.labelsMu.Lock()
	defer r.labelsMu.Unlock()
	m, err := r.readLabels(id)
	if err != nil {
		return err
	}
	if m == nil {
		m = map[string]string{}
	}
	maps.Copy(m, labels)
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(r.cfg.StateDir, "."+id+".*")
	if err != nil {
		return fmt.Errorf("update labels of container %s: %w", id, err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(b)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), r.labelsPath(id))
	}
	if err != nil {
		return fmt.Errorf("update labels of container %s: %w", id, err)
	}
	return nil
}

// removeLabels deletes the container's label file, if any.
func (r *Runtime) removeLabels(id string) error {
	if !validFileName(id) {
		return nil
	}
	r.labelsMu.Lock()
	defer r.labelsMu.Unlock()
	if err := os.Remove(r.labelsPath(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("destroy container %s: remove its labels: %w", id, err)
	}
	return nil
}
